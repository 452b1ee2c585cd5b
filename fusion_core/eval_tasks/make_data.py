"""Generate the data files of the bundled lm-eval tasks, deterministically.

    python -m fusion_core.eval_tasks.make_data            # (re)write fusion_core/eval_tasks/data/
    python -m fusion_core.eval_tasks.make_data --check    # exit 1 if the committed files differ

Every task has a test file (scored) and a disjoint few-shot file (used only when
num_fewshot > 0). Rows share one schema per task: `prompt` (the context shown to the model),
`answer` (an index into `choices` for multiple choice, the expected string for generation),
plus fields that let tests re-check every item (`suffix`/`test` for code, `op`/`operands` for
arithmetic).

The prose items are written for this file, not taken from any corpus the demo trains on (the
demo's prose is stdlib docstrings), so they are held out by construction. The code items are
small functions with one line missing; each wrong choice is checked here to fail the item's test
and the right one to pass it. The arithmetic prompts use the demo's line format "347 + 589 ="
(no "Q:" prefix), so a model trained on such lines is scored on what it knows.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 20260501
FEWSHOT = 8

# (context, ending); the first group is everyday English, the second technical English in the
# register of documentation. Distractor endings are drawn from the same group.
EVERYDAY = [
    ("When the kettle began to whistle, she", "poured the boiling water over the tea leaves."),
    ("The museum was closed on Monday, so we", "visited the botanical garden instead."),
    ("After three days of heavy rain, the river", "burst its banks and flooded the lower fields."),
    ("He forgot his umbrella at home and", "arrived at the office soaked to the skin."),
    ("The baker wakes up at four every morning", "so that the bread is ready when the shop opens."),
    ("Because the train was delayed by an hour, the passengers", "missed their connection in the next city."),
    ("The children built a snowman in the yard and", "gave it a carrot for a nose."),
    ("To keep the plants healthy, water them regularly and", "make sure they get enough sunlight."),
    ("The old bridge was too narrow for modern trucks, so the town",
     "decided to build a wider one next to it."),
    ("She practised the piano every evening, and by the end of the year",
     "she could play the whole sonata from memory."),
    ("The library asks visitors to keep their voices down", "so that others can read in peace."),
    ("When the power went out, we lit a few candles and", "played cards by their light."),
    ("The recipe calls for two eggs, a cup of flour and", "a pinch of salt."),
    ("The captain ordered the crew to lower the sails", "before the storm reached the ship."),
    ("Most birds in this region fly south in the autumn", "and return when the weather gets warmer."),
    ("The doctor told him to rest for a week and", "drink plenty of fluids."),
    ("Our neighbours adopted a small dog that", "barks at every passing bicycle."),
    ("The students had to hand in their essays by Friday, but", "the teacher gave them an extra weekend."),
    ("He counted the coins in his pocket and realised that", "he did not have enough for the bus fare."),
    ("The farmer looked at the dark clouds and", "hurried to bring the hay into the barn."),
    ("A good map shows not only the roads but also", "the rivers, hills and forests between them."),
    ("The concert ended with a long standing ovation, and", "the orchestra played one more piece as an encore."),
    ("Since the shop had run out of milk, I", "bought a carton at the petrol station on the way home."),
    ("The mountain path was steep and rocky, so the hikers", "stopped often to catch their breath."),
    ("At the end of the meeting, the chair thanked everyone and", "set the date for the next one."),
    ("The cat sat on the windowsill all afternoon,", "watching the sparrows in the garden."),
    ("The fire alarm rang during the lesson, and the pupils", "lined up calmly in the playground."),
    ("Although the restaurant was small, it", "was always full on Saturday nights."),
    ("The letter arrived two weeks late because", "the address on the envelope was wrong."),
    ("She opened the window to let in some fresh air and", "heard the church bells ringing in the distance."),
    ("The new bicycle lane made it safer", "for people to cycle to work."),
    ("Before going to bed, he set his alarm clock", "for six o'clock in the morning."),
    ("The gardener planted tulip bulbs in October", "so that they would flower in the spring."),
    ("During the long winter nights, the villagers", "gathered in the hall to tell stories."),
    ("The bus driver waited a moment for the old man", "who was running towards the stop."),
    ("Fresh snow covered the streets, and the morning traffic", "moved slowly through the city."),
]
TECHNICAL = [
    ("Return a new list containing the elements of the sequence", "in ascending order."),
    ("If the file does not exist, the function", "raises FileNotFoundError."),
    ("The cache stores recently used results so that", "repeated calls do not compute them again."),
    ("Each worker takes a task from the queue,", "runs it and reports the result."),
    ("The timeout is given in seconds; a value of None means", "that the call waits forever."),
    ("Lines longer than the limit are wrapped", "at the last space before the limit."),
    ("The parser reads the configuration file and", "returns a dictionary of settings."),
    ("Keys are compared without regard to case, so", "'Name' and 'name' refer to the same entry."),
    ("The iterator yields one chunk at a time, which keeps", "memory use low for very large files."),
    ("When the buffer is full, new data", "is written to disk before more is accepted."),
    ("The lock must be released by the same thread", "that acquired it."),
    ("A negative index counts from the end of the string, so", "-1 refers to the last character."),
    ("The connection is closed automatically when", "the with block ends."),
    ("The default encoding is UTF-8, but", "another one can be passed as an argument."),
    ("The function returns True if the path points to a directory", "and False otherwise."),
    ("Whitespace at the start and end of each line", "is removed before parsing."),
    ("If no random seed is given, the generator", "is initialised from the current time."),
    ("The log file is rotated when it grows beyond the size limit,", "and the oldest copy is deleted."),
    ("Dates are written in ISO format, with the year first,", "followed by the month and the day."),
    ("The method is called once for every item, in the order", "in which the items were added."),
    ("Unlike a list, a tuple cannot be changed", "after it has been created."),
    ("The server listens on the given port and", "handles each request in a new thread."),
    ("Errors in the input are reported with the line number", "where they were found."),
    ("Temporary files are created in the system's temporary directory and", "removed when they are closed."),
    ("The test suite runs every example in the documentation", "and compares the output with the expected text."),
    ("Passing an empty string as the separator", "raises a ValueError."),
    ("The sort is stable, which means that", "equal elements keep their original order."),
    ("The environment variable overrides the setting in the file, so",
     "it can be changed without editing the configuration."),
    ("Division by zero does not crash the calculator;", "it shows an error message instead."),
    ("The socket is set to non-blocking mode, so", "reads return immediately even when no data is available."),
    ("The progress bar is updated after each step,", "showing how much of the work is done."),
    ("Hidden files, whose names start with a dot,", "are skipped unless the flag is set."),
]

# (prefix, correct line, three wrong lines, suffix, test). The prompt is the prefix; the
# choices are complete lines with their indentation.
CODE = [
    ('def mean(xs):\n    """Return the arithmetic mean of the numbers in xs."""\n',
     "    return sum(xs) / len(xs)",
     ["    return sum(xs) * len(xs)", "    return len(xs) / sum(xs)", "    return sum(xs) / len(x)"],
     "", "assert mean([1, 2, 3, 6]) == 3"),
    ('def is_even(n):\n    """Return True if n is even."""\n',
     "    return n % 2 == 0",
     ["    return n % 2 == 1", "    return n / 2 == 0", "    return n % 2 = 0"],
     "", "assert is_even(4) and not is_even(7)"),
    ('def square(x):\n    """Return x multiplied by itself."""\n',
     "    return x * x",
     ["    return x + x", "    return x ** x", "    return x * 2"],
     "", "assert square(3) == 9 and square(5) == 25"),
    ('def last(items):\n    """Return the last element of items."""\n',
     "    return items[-1]",
     ["    return items[0]", "    return items[1]", "    return items[len(items)]"],
     "", "assert last([4, 5, 6]) == 6"),
    ('def reverse(s):\n    """Return the string s reversed."""\n',
     "    return s[::-1]",
     ["    return s[::1]", "    return s[-1]", "    return s.reverse()"],
     "", 'assert reverse("abc") == "cba"'),
    ('def count_vowels(text):\n    """Return how many vowels text contains."""\n    count = 0\n'
     '    for ch in text.lower():\n        if ch in "aeiou":\n',
     "            count += 1",
     ["            count -= 1", "            count = 1", "            return 1"],
     "    return count\n", 'assert count_vowels("Banana") == 3'),
    ('def factorial(n):\n    """Return n! for a non-negative integer n."""\n    result = 1\n'
     "    for i in range(2, n + 1):\n",
     "        result *= i",
     ["        result += i", "        result *= n", "        result = i"],
     "    return result\n", "assert factorial(5) == 120 and factorial(0) == 1"),
    ('def maximum(xs):\n    """Return the largest number in the non-empty list xs."""\n    best = xs[0]\n'
     "    for x in xs[1:]:\n        if x > best:\n",
     "            best = x",
     ["            x = best", "            best = xs", "            best += x"],
     "    return best\n", "assert maximum([3, 9, 2, 7]) == 9"),
    ('def clamp(x, low, high):\n    """Limit x to the range from low to high."""\n',
     "    return max(low, min(x, high))",
     ["    return min(low, max(x, high))", "    return max(low, min(x, low))", "    return max(x, min(low, high))"],
     "", "assert clamp(5, 0, 10) == 5 and clamp(-3, 0, 10) == 0 and clamp(15, 0, 10) == 10"),
    ('def word_count(sentence):\n    """Return the number of words in sentence, split on whitespace."""\n',
     "    return len(sentence.split())",
     ["    return len(sentence)", "    return sentence.split()", '    return len(sentence.split(""))'],
     "", 'assert word_count("the quick brown fox") == 4'),
    ('def celsius_to_fahrenheit(c):\n    """Convert a temperature from degrees Celsius to degrees Fahrenheit."""\n',
     "    return c * 9 / 5 + 32",
     ["    return (c - 32) * 5 / 9", "    return c * 5 / 9 + 32", "    return c * 9 / 5 - 32"],
     "", "assert celsius_to_fahrenheit(100) == 212 and celsius_to_fahrenheit(0) == 32"),
    ('def is_palindrome(s):\n    """Return True if s reads the same forwards and backwards."""\n',
     "    return s == s[::-1]",
     ["    return s == s[::1]", "    return s != s[::-1]", "    return s[0] == s[1]"],
     "", 'assert is_palindrome("level") and not is_palindrome("python")'),
    ('def unique(items):\n    """Return the distinct elements of items, in the order they first appear."""\n'
     "    seen = []\n    for item in items:\n        if item not in seen:\n",
     "            seen.append(item)",
     ["            seen.append(items)", "            seen.remove(item)", "            seen = item"],
     "    return seen\n", "assert unique([3, 1, 3, 2, 1]) == [3, 1, 2]"),
    ('def fibonacci(n):\n    """Return the n-th Fibonacci number, with fibonacci(0) == 0."""\n    a, b = 0, 1\n'
     "    for _ in range(n):\n",
     "        a, b = b, a + b",
     ["        a, b = a + b, b", "        a = b", "        a, b = b, a * b"],
     "    return a\n", "assert [fibonacci(i) for i in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]"),
    ('def total_price(prices, tax_rate):\n    """Return the sum of prices with tax added at tax_rate (0.2 means 20 %)."""\n',
     "    return sum(prices) * (1 + tax_rate)",
     ["    return sum(prices) * tax_rate", "    return sum(prices) + tax_rate",
      "    return len(prices) * (1 + tax_rate)"],
     "", "assert abs(total_price([10, 20], 0.5) - 45) < 1e-9"),
    ('def first_word(text):\n    """Return the first word of text."""\n',
     "    return text.split()[0]",
     ["    return text.split()[-1]", "    return text[0]", "    return text.split(0)"],
     "", 'assert first_word("hello big world") == "hello"'),
    ('def flatten(nested):\n    """Turn a list of lists into one flat list."""\n    result = []\n'
     "    for inner in nested:\n",
     "        result.extend(inner)",
     ["        result.append(inner)", "        result = inner", "        inner.extend(result)"],
     "    return result\n", "assert flatten([[1, 2], [3], [4, 5]]) == [1, 2, 3, 4, 5]"),
    ('def count_words(words):\n    """Return a dictionary mapping each word to how often it occurs."""\n'
     "    counts = {}\n    for word in words:\n",
     "        counts[word] = counts.get(word, 0) + 1",
     ["        counts[word] = 1", "        counts[word] += 1", "        counts[word] = counts.get(word, 1)"],
     "    return counts\n", 'assert count_words(["a", "b", "a"]) == {"a": 2, "b": 1}'),
    ('def average_length(words):\n    """Return the average number of characters per word."""\n',
     "    return sum(len(w) for w in words) / len(words)",
     ["    return len(words) / sum(len(w) for w in words)", "    return sum(len(words) for w in words) / len(words)",
      "    return sum(len(w) for w in words) // len(words) + 1"],
     "", 'assert average_length(["ab", "abcd"]) == 3'),
    ('def capitalize_words(s):\n    """Capitalise the first letter of every word in s."""\n',
     '    return " ".join(w.capitalize() for w in s.split())',
     ['    return " ".join(w.upper() for w in s.split())', '    return "".join(w.capitalize() for w in s.split())',
      "    return s.capitalize()"],
     "", 'assert capitalize_words("hello big world") == "Hello Big World"'),
    ('def gcd(a, b):\n    """Return the greatest common divisor of a and b."""\n    while b:\n',
     "        a, b = b, a % b",
     ["        a, b = b, a // b", "        return a % b", "        a, b = a, a % b"],
     "    return a\n", "assert gcd(12, 18) == 6 and gcd(7, 5) == 1"),
    ('def contains_digit(s):\n    """Return True if any character of s is a digit."""\n',
     "    return any(ch.isdigit() for ch in s)",
     ["    return all(ch.isdigit() for ch in s)", "    return any(ch.isalpha() for ch in s)",
      "    return any(s.isdigit() for ch in s)"],
     "", 'assert contains_digit("abc1") and not contains_digit("abc")'),
    ('def percent(part, whole):\n    """Return part as a percentage of whole."""\n',
     "    return 100 * part / whole",
     ["    return 100 * whole / part", "    return part / whole", "    return 100 * part - whole"],
     "", "assert percent(1, 4) == 25"),
    ('def repeat_string(s, times, sep):\n    """Join times copies of s with sep between them."""\n',
     "    return sep.join([s] * times)",
     ["    return s.join([sep] * times)", "    return sep.join(s * times)", "    return (s + sep) * times"],
     "", 'assert repeat_string("ab", 3, "-") == "ab-ab-ab"'),
    ('def safe_divide(a, b):\n    """Return a / b, or None when b is zero."""\n    if b == 0:\n',
     "        return None",
     ["        return 0", "        return a / b", "        return b"],
     "    return a / b\n", "assert safe_divide(6, 3) == 2 and safe_divide(1, 0) is None"),
    ('def squares(n):\n    """Return the list of the squares of 0, 1, ..., n - 1."""\n',
     "    return [i * i for i in range(n)]",
     ["    return [i * i for i in range(1, n)]", "    return [i * 2 for i in range(n)]",
      "    return [n * n for i in range(n)]"],
     "", "assert squares(4) == [0, 1, 4, 9]"),
    ('def read_lines(f):\n    """Return the lines read from the open text file f, without line endings."""\n',
     "    return f.read().splitlines()",
     ["    return f.read().split()", "    return f.readlines()", "    return f.read()"],
     "", "import io\nassert read_lines(io.StringIO('a b\\nc\\n')) == ['a b', 'c']"),
    ('def dot(u, v):\n    """Return the dot product of the vectors u and v."""\n',
     "    return sum(a * b for a, b in zip(u, v))",
     ["    return sum(a + b for a, b in zip(u, v))", "    return sum(a * b for a in u for b in v)",
      "    return [a * b for a, b in zip(u, v)]"],
     "", "assert dot([1, 2, 3], [4, 5, 6]) == 32"),
    ('def initials(name):\n    """Return the initials of a full name, e.g. \'Ada Lovelace\' -> \'AL\'."""\n',
     '    return "".join(part[0] for part in name.split())',
     ['    return "".join(part[-1] for part in name.split())', '    return "".join(part[0] for part in name)',
      "    return name.split()[0]"],
     "", 'assert initials("Ada Lovelace") == "AL"'),
    ('class Counter:\n    """Count how many times increment has been called."""\n\n    def __init__(self):\n'
     "        self.value = 0\n\n    def increment(self):\n",
     "        self.value += 1",
     ["        value += 1", "        self.value = 1", "        self.value -= 1"],
     "", "c = Counter()\nc.increment()\nc.increment()\nassert c.value == 2"),
    ('class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n        self.items = []\n\n'
     "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n",
     "        return self.items.pop()",
     ["        return self.items.pop(0)", "        return self.items[0]", "        self.items.pop()"],
     "", "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2\nassert s.items == [1]"),
    ('def running_total(xs):\n    """Return the running sums of xs: [1, 2, 3] -> [1, 3, 6]."""\n    totals = []\n'
     "    total = 0\n    for x in xs:\n        total += x\n",
     "        totals.append(total)",
     ["        totals.append(x)", "        totals = total", "        totals.append(total + x)"],
     "    return totals\n", "assert running_total([1, 2, 3]) == [1, 3, 6]"),
    ('def digits(n):\n    """Return the decimal digits of the non-negative integer n as a list."""\n',
     "    return [int(d) for d in str(n)]",
     ["    return [d for d in str(n)]", "    return [int(d) for d in n]", "    return list(range(n))"],
     "", "assert digits(405) == [4, 0, 5]"),
    ('def merge_dicts(a, b):\n    """Return a new dict with the items of a, updated with those of b."""\n'
     "    result = dict(a)\n",
     "    result.update(b)",
     ["    result.update(a)", "    result = b", "    b.update(result)"],
     "    return result\n", 'assert merge_dicts({"x": 1, "y": 2}, {"y": 3}) == {"x": 1, "y": 3}'),
    ('def is_leap_year(year):\n    """Return True if year is a leap year in the Gregorian calendar."""\n',
     "    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
     ["    return year % 4 == 0", "    return year % 4 == 0 and year % 100 != 0", "    return year % 400 == 0"],
     "", "assert is_leap_year(2024) and is_leap_year(2000)\nassert not is_leap_year(1900) and not is_leap_year(2023)"),
    ('def filter_positive(xs):\n    """Return the numbers of xs that are greater than zero."""\n',
     "    return [x for x in xs if x > 0]",
     ["    return [x for x in xs if x < 0]", "    return [x > 0 for x in xs]", "    return [x for x in xs if x >= 0]"],
     "", "assert filter_positive([3, -1, 0, 5]) == [3, 5]"),
    ('def to_binary(n):\n    """Return the binary digits of the non-negative integer n as a string."""\n',
     "    return bin(n)[2:]",
     ["    return bin(n)", "    return str(n)", "    return hex(n)[2:]"],
     "", 'assert to_binary(5) == "101" and to_binary(8) == "1000"'),
    ('def min_max(xs):\n    """Return the smallest and the largest element of xs as a pair."""\n',
     "    return min(xs), max(xs)",
     ["    return max(xs), min(xs)", "    return min(xs), min(xs)", "    return xs[0], xs[-1]"],
     "", "assert min_max([4, 1, 9, 7]) == (1, 9)"),
    ('def remove_spaces(s):\n    """Return s with every space character removed."""\n',
     '    return s.replace(" ", "")',
     ['    return s.replace("", " ")', "    return s.strip()", "    return s.split()"],
     "", 'assert remove_spaces(" a b c ") == "abc"'),
    ('import math\n\n\ndef area_of_circle(r):\n    """Return the area of a circle with radius r."""\n',
     "    return math.pi * r ** 2",
     ["    return 2 * math.pi * r", "    return math.pi * r * 2", "    return math.pi * r"],
     "", "assert abs(area_of_circle(3) - 9 * math.pi) < 1e-9"),
    ('def elapsed_minutes(start, end):\n    """Return the minutes between two times given as (hours, minutes) pairs."""\n',
     "    return (end[0] - start[0]) * 60 + end[1] - start[1]",
     ["    return (end[0] - start[0]) * 60 + start[1] - end[1]", "    return (end[0] - start[0]) + end[1] - start[1]",
      "    return (start[0] - end[0]) * 60 + end[1] - start[1]"],
     "", "assert elapsed_minutes((9, 15), (10, 45)) == 90"),
    ('def longest_word(words):\n    """Return the longest string in words."""\n',
     "    return max(words, key=len)",
     ["    return min(words, key=len)", "    return max(words)", "    return len(max(words, key=len))"],
     "", 'assert longest_word(["kiwi", "banana", "fig"]) == "banana"'),
    ('def count_lines(text):\n    """Return the number of non-empty lines in text."""\n',
     "    return sum(1 for line in text.splitlines() if line.strip())",
     ["    return len(text.splitlines())", "    return sum(1 for line in text.splitlines() if not line.strip())",
      "    return len(text)"],
     "", 'assert count_lines("a\\n\\nb\\n   \\nc\\n") == 3'),
    ('def chunks(xs, size):\n    """Split xs into consecutive lists of at most size elements."""\n',
     "    return [xs[i:i + size] for i in range(0, len(xs), size)]",
     ["    return [xs[i:i + size] for i in range(0, len(xs))]", "    return [xs[i:size] for i in range(0, len(xs), size)]",
      "    return [xs[i] for i in range(0, len(xs), size)]"],
     "", "assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]"),
    ('def normalize(xs):\n    """Scale the numbers xs so that they sum to one."""\n    total = sum(xs)\n',
     "    return [x / total for x in xs]",
     ["    return [total / x for x in xs]", "    return [x * total for x in xs]", "    return [x / len(xs) for x in xs]"],
     "", "assert normalize([1, 3]) == [0.25, 0.75]"),
    ('def has_duplicates(items):\n    """Return True if some element occurs more than once in items."""\n',
     "    return len(set(items)) < len(items)",
     ["    return len(set(items)) == len(items)", "    return len(set(items)) > len(items)",
      "    return set(items) == items"],
     "", "assert has_duplicates([1, 2, 1]) and not has_duplicates([1, 2, 3])"),
    ('def power_of_two(n):\n    """Return True if the positive integer n is a power of two."""\n',
     "    return n & (n - 1) == 0",
     ["    return n & (n + 1) == 0", "    return n % 2 == 0", "    return n | (n - 1) == 0"],
     "", "assert power_of_two(8) and power_of_two(1) and not power_of_two(12)"),
    ('def shorten(title, limit):\n    """Shorten title to at most limit characters, ending with \'...\' when cut."""\n'
     "    if len(title) <= limit:\n        return title\n",
     '    return title[:limit - 3] + "..."',
     ['    return title[:limit] + "..."', '    return title[limit - 3:] + "..."', "    return title[:limit - 3]"],
     "", 'assert shorten("short", 10) == "short"\nassert shorten("a very long title", 10) == "a very ..."'),
]

NAMES = [("Ann", "she"), ("Tom", "he"), ("Maria", "she"), ("Omar", "he"), ("Lena", "she"), ("Raj", "he")]
THINGS = ["apples", "marbles", "stamps", "pencils", "cards", "shells"]


# ----------------------------------------------------------------------------- checks

def run_code_item(row: dict, line: str, *, budget: int = 200_000, seconds: float = 10.0) -> str | None:
    """Run the item's test with `line` in place. Returns None if it passes, else why it fails.

    Accidental infinite loops are stopped by a budget of traced lines and, in the main thread
    on POSIX, by a wall-clock alarm (a loop on one line emits no line events).
    """
    source = row["prompt"] + line + "\n" + row["suffix"] + "\n" + row["test"] + "\n"
    try:
        code = compile(source, f"<{row['id']}>", "exec")
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg}"
    steps = [0]

    def tracer(frame, event, arg):
        if event == "line":
            steps[0] += 1
            if steps[0] > budget:
                raise TimeoutError("line budget exceeded")
        return tracer

    def alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if use_alarm:
        old_handler = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        exec(code, {"__name__": f"fusion_eval_item_{row['id']}"})
    except Exception as exc:  # the wrong lines fail in many ways
        return f"{type(exc).__name__}: {exc}"
    finally:
        sys.settrace(previous)
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
    return None


def check_row(task: str, row: dict) -> list[str]:
    """Problems with one data row of `task` (empty list when it is valid)."""
    problems = []
    if task.endswith("_mc"):
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            problems.append("choices must be a list of at least two strings")
        elif len(set(choices)) != len(choices):
            problems.append("choices are not distinct")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices or []):
            problems.append(f"answer {answer!r} is not an index into choices")
        if problems:
            return problems
    if task == "fusion_code_mc":
        for i, choice in enumerate(row["choices"]):
            failure = run_code_item(row, choice)
            if i == row["answer"] and failure is not None:
                problems.append(f"correct line fails its test: {failure}")
            if i != row["answer"] and failure is None:
                problems.append(f"wrong line {choice!r} passes the test")
    if task.startswith("fusion_arith"):
        a, b = row["operands"]
        expected = {"+": a + b, "-": a - b, "*": a * b}[row["op"]]
        got = int(row["choices"][row["answer"]]) if task.endswith("_mc") else int(row["answer"])
        if got != expected:
            problems.append(f"answer {got} != {a} {row['op']} {b} = {expected}")
        if row["kind"] == "equation" and row["prompt"] != f"{a} {row['op']} {b} =":
            problems.append(f"prompt {row['prompt']!r} does not state {a} {row['op']} {b}")
    return problems


# ----------------------------------------------------------------------------- builders

def _split(rows: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    rng.shuffle(order)
    fewshot = sorted(order[:FEWSHOT])
    test = sorted(order[FEWSHOT:])
    return [rows[i] for i in test], [rows[i] for i in fewshot]


def build_prose(rng: random.Random) -> list[dict]:
    rows = []
    for group_name, group in (("everyday", EVERYDAY), ("technical", TECHNICAL)):
        endings = [ending for _, ending in group]
        assert len(set(endings)) == len(endings), f"duplicate endings in {group_name}"
        for i, (context, ending) in enumerate(group):
            others = rng.sample([e for j, e in enumerate(endings) if j != i], 3)
            choices = [ending, *others]
            rng.shuffle(choices)
            rows.append({"id": f"prose-{group_name}-{i:02d}", "register": group_name, "prompt": context,
                         "choices": choices, "answer": choices.index(ending)})
    return rows


def build_code(rng: random.Random) -> list[dict]:
    rows = []
    for i, (prefix, correct, wrong, suffix, test) in enumerate(CODE):
        choices = [correct, *wrong]
        rng.shuffle(choices)
        rows.append({"id": f"code-{i:02d}", "prompt": prefix, "choices": choices,
                     "answer": choices.index(correct), "suffix": suffix, "test": test})
    return rows


def _arith_problem(rng: random.Random, kind: str) -> tuple[str, str, int, int, int]:
    """(kind, op, a, b, result) for one problem; kind picks the operand ranges.

    Mostly small operands (facts a small model can learn), some three-digit sums.
    """
    if kind == "add1":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return "equation", "+", a, b, a + b
    if kind == "add2":
        a, b = rng.randint(10, 99), rng.randint(1, 99)
        return "equation", "+", a, b, a + b
    if kind == "add3":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return "equation", "+", a, b, a + b
    if kind == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        return "equation", "-", a, b, a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return "equation", "*", a, b, a * b
    raise ValueError(kind)


def _word_problem(rng: random.Random) -> tuple[str, str, int, int, int]:
    name, pron = rng.choice(NAMES)
    things = rng.choice(THINGS)
    form = rng.randrange(5)
    if form == 0:
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        q = (f"{name} has {a} {things}. {pron.capitalize()} gets {b} more. "
             f"How many {things} does {pron} have now?")
        return q, "+", a, b, a + b
    if form == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {things} and gave {b} of them to a friend. How many {things} are left?"
        return q, "-", a, b, a - b
    if form == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        q = f"A box holds {a} {things}. How many {things} are in {b} boxes?"
        return q, "*", a, b, a * b
    if form == 3:
        a, b = rng.randint(5, 80), rng.randint(5, 80)
        q = f"There are {a} {things} in a basket and {b} in a bag. How many {things} are there in total?"
        return q, "+", a, b, a + b
    a, b = rng.randint(3, 25), rng.randint(2, 9)
    q = f"{name} reads {a} pages a day. How many pages does {pron} read in {b} days?"
    return q, "*", a, b, a * b


def _arith_rows(rng: random.Random, prefix: str, n_equations: int, n_words: int) -> list[dict]:
    kinds = ["add1", "add2", "add3", "sub", "mul"]
    rows, seen = [], set()
    while len(rows) < n_equations:
        kind, op, a, b, result = _arith_problem(rng, kinds[len(rows) % len(kinds)])
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        rows.append({"kind": kind, "prompt": f"{a} {op} {b} =", "op": op, "operands": [a, b], "result": result})
    while len(rows) < n_equations + n_words:
        question, op, a, b, result = _word_problem(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"kind": "word_problem", "prompt": f"Question: {question}\nAnswer:", "op": op,
                     "operands": [a, b], "result": result})
    for i, row in enumerate(rows):
        row["id"] = f"{prefix}-{i:03d}"
    return rows


def build_arith_gen(rng: random.Random) -> list[dict]:
    rows = _arith_rows(rng, "arith-gen", 66, 22)
    return [{"id": r["id"], "kind": r["kind"], "prompt": r["prompt"], "op": r["op"], "operands": r["operands"],
             "answer": str(r["result"])} for r in rows]


def _distractors(rng: random.Random, op: str, a: int, b: int, result: int) -> list[int]:
    """Three plausible wrong results: off by one, ten or a hundred, or the wrong operation."""
    candidates = {result + 1, result - 1, result + 10, result - 10, result + 2, result - 2}
    if result >= 100:
        candidates |= {result + 100, result - 100}
    candidates |= {a + b, abs(a - b)}  # the wrong operation
    if a * b < 1000:
        candidates.add(a * b)
    candidates = sorted(c for c in candidates if c >= 0 and c != result)
    return rng.sample(candidates, 3)


def build_arith_mc(rng: random.Random) -> list[dict]:
    rows = _arith_rows(rng, "arith-mc", 66, 22)
    out = []
    for r in rows:
        numbers = [r["result"], *_distractors(rng, r["op"], *r["operands"], r["result"])]
        rng.shuffle(numbers)
        choices = [str(x) for x in numbers]
        out.append({"id": r["id"], "kind": r["kind"], "prompt": r["prompt"], "op": r["op"],
                    "operands": r["operands"], "choices": choices, "answer": numbers.index(r["result"])})
    return out


BUILDERS = {
    "fusion_prose_mc": build_prose,
    "fusion_code_mc": build_code,
    "fusion_arith_gen": build_arith_gen,
    "fusion_arith_mc": build_arith_mc,
}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def build_all() -> dict[str, str]:
    """The content of every data file, by file name: '<task>.test.jsonl' and '<task>.fewshot.jsonl'.

    Raises ValueError if any generated row fails its check.
    """
    files = {}
    for k, (task, builder) in enumerate(BUILDERS.items()):
        rng = random.Random(SEED + k)
        rows = builder(rng)
        problems = [f"{task} {row['id']}: {p}" for row in rows for p in check_row(task, row)]
        if problems:
            raise ValueError("invalid generated items:\n" + "\n".join(problems))
        test, fewshot = _split(rows, rng)
        files[f"{task}.test.jsonl"] = _jsonl(test)
        files[f"{task}.fewshot.jsonl"] = _jsonl(fewshot)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="folder for the jsonl files")
    parser.add_argument("--check", action="store_true", help="only compare with the files in --out")
    args = parser.parse_args(argv)
    files = build_all()
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"differs: {args.out / name}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out / name} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
