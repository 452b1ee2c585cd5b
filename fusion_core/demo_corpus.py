"""The embedded demo's corpus: three domains where different sources are strong.

- prose: real English, the docstrings of the Python standard library (read with `ast` from the
  running interpreter's own stdlib, ASCII only). The generalist (SmolLM2) is strong here.
- code: Python modules generated from templates in one consistent house style (a dataclass,
  functions over it, tests with correct expected values). A tiny specialist trained on the
  same generator learns the style and the identifier lists; a generalist has to guess them.
- arithmetic: worksheets of equations, column additions worked digit by digit, and word
  problems, all in lower case and all with correct answers.
- mixed (held out: for validation and test only, docs/method.md "Experimental protocol"): documents
  that switch domain inside, from the same generators on their own seed stream: generated code
  whose module docstring and comments are prose paragraphs, prose with worked arithmetic between
  its sentences, and prose around a generated function. Their prose comes from docstrings of
  stdlib packages that neither the demo nor the training prose reads, so no paragraph of a mixed
  document is in any other corpus. Finite: ~110 KB, so scale > ~3.5 returns all of it.

Two disjoint streams come from the same generators: `write_demo_corpus` (what the fusion
pipeline trains and evaluates on) and `specialist_training_texts` (what the specialists and the
target tokenizer are trained on). Disjointness is by construction, not by chance: generated
documents are routed by a hash of their text (1 bucket in 8 for the demo, 7 in 8 for
training), and prose by a hash of the top-level stdlib module it comes from (2 in 8 for the
demo: ~190 KB, so scale > ~4 returns all of it). For a given seed the output is byte-identical
across runs on the same Python version (prose depends on the stdlib sources).

Measured (seed 0, scale 1; bits per byte, lower is better): SmolLM2-135M prose 1.04, code
0.53, arithmetic 1.09; the code specialist 0.29 on code, the arithmetic specialist 0.69 on
arithmetic, both above 8 elsewhere (fusion_core.specialists).
"""
from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sysconfig
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

DOMAINS: tuple[str, ...] = ("prose", "code", "arithmetic")
# Held-out domains: demo documents only, never training text for a specialist or the tokenizer.
HELDOUT_DOMAINS: tuple[str, ...] = ("mixed",)
BUILTIN_DOMAINS: tuple[str, ...] = DOMAINS + HELDOUT_DOMAINS
# Bump whenever a change here changes the text produced for some (seed, scale): caches of the
# corpus and of the models trained on it (fusion_core.specialists) are keyed by it.
CORPUS_VERSION = "1"
# The same for the mixed corpus alone: no model is trained on it, so it has its own version and
# a change to it does not retrain the specialists.
MIXED_CORPUS_VERSION = "1"

# Text per domain at scale 1.0, sized by what SmolLM2 has to score (~300 tokens/s on 2 CPU
# cores). It reads prose at ~3.9 and code at ~3.5 characters per token but arithmetic at ~1.6
# (every digit is a token), so arithmetic gets fewer characters: ~43k SmolLM2 tokens in all.
# Mixed is evaluation-only (no teacher scores it), sized for a few dozen documents in each of
# validation and test.
DEMO_CHARS_PER_DOMAIN: dict[str, int] = {"prose": 45_000, "code": 45_000, "arithmetic": 30_000, "mixed": 36_000}
MIN_DOC_CHARS, MAX_DOC_CHARS = 300, 1500
MAX_ARITHMETIC_DOC_CHARS = 1000  # ~650 SmolLM2 tokens: every document fits a 1024-token context
# Short, so that most chunks of a mixed document still switch domain: at the demo's 256 tokens the
# arithmetic specialist's tokenizer (~1.4 characters per token) cuts them into ~2.3 chunks, and
# 99 of the 135 chunks (seed 0) hold prose and code or arithmetic.
MAX_MIXED_DOC_CHARS = 900

_DEMO_BUCKETS = 8  # a generated document is a demo document iff its hash falls in bucket 0 of 8
_PROSE_DEMO_BUCKETS = 2  # prose is finite: 2 of 8 stdlib modules go to the demo side


def _bucket(key: str) -> int:
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % _DEMO_BUCKETS


def _is_demo(key: str, buckets: int = 1) -> bool:
    return _bucket(key) < buckets


# ----------------------------------------------------------------------------------------------
# prose: stdlib docstrings


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _documented_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Module, class and function nodes in source order, walking statement lists only.

    (ast.walk visits every expression node as well, which makes it ~5x slower here.)
    """
    if isinstance(node, _DOCUMENTED):
        yield node
    for name in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, name, ()) or ():
            if isinstance(child, ast.stmt | ast.excepthandler):
                yield from _documented_nodes(child)


@lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(module relative path, its ASCII docstrings in source order), sorted by path."""
    root = _stdlib_root()
    out = []
    # Top-level modules only (168 files, ~0.8 MB of docstrings): parsing all of the stdlib
    # takes several times longer and is not needed at the demo's scale.
    for path in sorted(root.glob("*.py"), key=lambda p: p.name):
        rel = path.name
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        docs = []
        for node in _documented_nodes(tree):
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < 80 or not doc.isascii():
                continue
            doc = "\n".join(line.rstrip() for line in doc.strip().splitlines())
            if doc not in docs:
                docs.append(doc)
        if docs:
            out.append((rel, tuple(docs)))
    return tuple(out)


def _chunk_paragraphs(docs: tuple[str, ...]) -> list[str]:
    """Pack docstrings into documents of MIN..MAX chars, cutting only between paragraphs."""
    paragraphs = [p.strip() for d in docs for p in d.split("\n\n") if p.strip()]
    chunks, cur = [], ""
    for p in paragraphs:
        if len(p) > MAX_DOC_CHARS:
            continue  # a single huge paragraph (tables, lists of names) is not prose
        if cur and len(cur) + 2 + len(p) > MAX_DOC_CHARS:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        chunks.append(cur)
    return [c for c in chunks if len(c) >= MIN_DOC_CHARS]


@lru_cache(maxsize=1)
def _prose_pools() -> dict[bool, tuple[str, ...]]:
    """{is_demo: documents}; the split is by module, and no demo document repeats a training one."""
    pools: dict[bool, list[str]] = {True: [], False: []}
    for rel, docs in _stdlib_docstrings():
        pools[_is_demo("prose:" + rel, _PROSE_DEMO_BUCKETS)].extend(_chunk_paragraphs(docs))
    train = set(pools[False])
    demo = [d for d in dict.fromkeys(pools[True]) if d not in train]
    return {True: tuple(demo), False: tuple(dict.fromkeys(pools[False]))}


def _prose_docs(rng: random.Random, demo: bool) -> Iterator[str]:
    pool = list(_prose_pools()[demo])
    rng.shuffle(pool)
    yield from pool  # finite: the stream ends when the pool is used up


# ----------------------------------------------------------------------------------------------
# code: template-generated Python in one house style

_NOUNS = [
    ("order", "orders"), ("item", "items"), ("user", "users"), ("record", "records"),
    ("packet", "packets"), ("sample", "samples"), ("task", "tasks"), ("event", "events"),
    ("account", "accounts"), ("reading", "readings"), ("ticket", "tickets"), ("invoice", "invoices"),
    ("message", "messages"), ("player", "players"), ("city", "cities"), ("entry", "entries"),
    ("batch", "batches"), ("job", "jobs"), ("sensor", "sensors"), ("parcel", "parcels"),
    ("booking", "bookings"), ("product", "products"), ("route", "routes"), ("student", "students"),
]
_ATTRS = [
    "price", "weight", "size", "age", "level", "priority", "duration", "amount", "rank",
    "length", "cost", "speed", "score", "depth", "width", "height", "volume", "quota",
]
_LABELS = ["name", "code", "label", "owner", "region", "status"]


def _camel(word: str) -> str:
    return word[:1].upper() + word[1:]


class _CodeModule:
    """One generated module: a dataclass and functions over it, with tests that hold."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.sing, self.plural = rng.choice(_NOUNS)
        self.cls = _camel(self.sing)
        self.label = rng.choice(_LABELS)
        self.attrs = rng.sample(_ATTRS, rng.randint(2, 3))
        self.examples = self._examples()

    def _examples(self) -> list[tuple]:
        r = self.rng
        names = r.sample(["a", "b", "c", "d", "e", "f", "g"], r.randint(3, 4))
        return [(n, *[r.randint(1, 20) for _ in self.attrs]) for n in sorted(names)]

    def _literal(self) -> str:
        items = ", ".join(
            f'{self.cls}("{ex[0]}", {", ".join(str(v) for v in ex[1:])})' for ex in self.examples
        )
        return f"[{items}]"

    def _values(self, attr: str) -> list[int]:
        i = self.attrs.index(attr) + 1
        return [ex[i] for ex in self.examples]

    def header(self) -> str:
        fields = "\n".join(f"    {a}: int" for a in self.attrs)
        attr_text = " and ".join(self.attrs)
        return (
            "from dataclasses import dataclass\n\n\n"
            "@dataclass\n"
            f"class {self.cls}:\n"
            f'    """One {self.sing} with a {self.label} and its {attr_text}."""\n\n'
            f"    {self.label}: str\n{fields}\n"
        )

    # Each template returns (function source, test source or "").
    def total(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        fn = f"total_{a}"
        src = (
            f"def {fn}({self.plural}: list[{self.cls}]) -> int:\n"
            f'    """Return the sum of the {a} of all {self.plural}."""\n'
            f"    total = 0\n"
            f"    for {self.sing} in {self.plural}:\n"
            f"        total += {self.sing}.{a}\n"
            f"    return total\n"
        )
        return src, f"    assert {fn}({self.plural}) == {sum(self._values(a))}\n"

    def above(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        limit = self.rng.randint(3, 15)
        fn = f"{self.plural}_above_{a}"
        src = (
            f"def {fn}({self.plural}: list[{self.cls}], limit: int) -> list[{self.cls}]:\n"
            f'    """Return the {self.plural} whose {a} is greater than limit."""\n'
            f"    return [{self.sing} for {self.sing} in {self.plural} if {self.sing}.{a} > limit]\n"
        )
        n = sum(v > limit for v in self._values(a))
        return src, f"    assert len({fn}({self.plural}, {limit})) == {n}\n"

    def largest(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        fn = f"largest_{a}"
        src = (
            f"def {fn}({self.plural}: list[{self.cls}]) -> {self.cls} | None:\n"
            f'    """Return the {self.sing} with the largest {a}, or None if there are none."""\n'
            f"    best = None\n"
            f"    for {self.sing} in {self.plural}:\n"
            f"        if best is None or {self.sing}.{a} > best.{a}:\n"
            f"            best = {self.sing}\n"
            f"    return best\n"
        )
        vals = self._values(a)
        winner = self.examples[vals.index(max(vals))][0]
        return src, f'    assert {fn}({self.plural}).{self.label} == "{winner}"\n'

    def count_by(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        fn = f"count_by_{a}"
        src = (
            f"def {fn}({self.plural}: list[{self.cls}]) -> dict[int, int]:\n"
            f'    """Return how many {self.plural} there are for each {a}."""\n'
            f"    counts: dict[int, int] = {{}}\n"
            f"    for {self.sing} in {self.plural}:\n"
            f"        counts[{self.sing}.{a}] = counts.get({self.sing}.{a}, 0) + 1\n"
            f"    return counts\n"
        )
        vals = self._values(a)
        v = vals[0]
        return src, f"    assert {fn}({self.plural})[{v}] == {vals.count(v)}\n"

    def scaled(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        k = self.rng.randint(2, 9)
        fn = f"scale_{a}"
        src = (
            f"def {fn}({self.sing}: {self.cls}, factor: int) -> {self.cls}:\n"
            f'    """Return a copy of the {self.sing} with its {a} multiplied by factor."""\n'
            f"    return {self.cls}(\n"
            + "".join(
                f"        {f}={self.sing}.{f}{' * factor' if f == a else ''},\n" for f in [self.label, *self.attrs]
            )
            + "    )\n"
        )
        first = self.examples[0][self.attrs.index(a) + 1]
        return src, f"    assert {fn}({self.plural}[0], {k}).{a} == {first * k}\n"

    def by_label(self) -> tuple[str, str]:
        fn = f"{self.plural}_by_{self.label}"
        src = (
            f"def {fn}({self.plural}: list[{self.cls}]) -> dict[str, {self.cls}]:\n"
            f'    """Return the {self.plural} keyed by their {self.label}."""\n'
            f"    return {{{self.sing}.{self.label}: {self.sing} for {self.sing} in {self.plural}}}\n"
        )
        return src, f"    assert sorted({fn}({self.plural})) == {sorted(ex[0] for ex in self.examples)!r}\n"

    def describe(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        fn = f"describe_{self.sing}"
        src = (
            f"def {fn}({self.sing}: {self.cls}) -> str:\n"
            f'    """Return a one-line description of the {self.sing}."""\n'
            f'    return f"{self.sing} {{{self.sing}.{self.label}}} has {a} {{{self.sing}.{a}}}"\n'
        )
        ex = self.examples[0]
        text = f"{self.sing} {ex[0]} has {a} {ex[self.attrs.index(a) + 1]}"
        return src, f'    assert {fn}({self.plural}[0]) == "{text}"\n'

    def sort_by(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        fn = f"sort_by_{a}"
        src = (
            f"def {fn}({self.plural}: list[{self.cls}]) -> list[{self.cls}]:\n"
            f'    """Return the {self.plural} sorted by {a}, smallest first."""\n'
            f"    return sorted({self.plural}, key=lambda {self.sing}: {self.sing}.{a})\n"
        )
        vals = self._values(a)
        return src, f"    assert {fn}({self.plural})[0].{a} == {min(vals)}\n"

    def average(self) -> tuple[str, str]:
        a = self.rng.choice(self.attrs)
        fn = f"average_{a}"
        src = (
            f"def {fn}({self.plural}: list[{self.cls}]) -> float:\n"
            f'    """Return the mean {a} of the {self.plural}, or 0.0 if there are none."""\n'
            f"    if not {self.plural}:\n"
            f"        return 0.0\n"
            f"    return sum({self.sing}.{a} for {self.sing} in {self.plural}) / len({self.plural})\n"
        )
        vals = self._values(a)
        return src, f"    assert {fn}({self.plural}) == {sum(vals) / len(vals)!r}\n"

    TEMPLATES: tuple[str, ...] = (
        "total", "above", "largest", "count_by", "scaled", "by_label", "describe", "sort_by", "average",
    )

    def render(self) -> str:
        names = self.rng.sample(self.TEMPLATES, self.rng.randint(2, 4))
        parts, tests = [self.header()], []
        for name in names:
            src, test = getattr(self, name)()
            parts.append(src)
            tests.append(test)
        if self.rng.random() < 0.7:
            parts.append(
                f"def test_{self.plural}() -> None:\n"
                f"    {self.plural} = {self._literal()}\n" + "".join(tests)
            )
        return "\n\n".join(parts)


def _code_doc(rng: random.Random) -> str:
    return _CodeModule(rng).render()


# ----------------------------------------------------------------------------------------------
# arithmetic: worksheets with correct answers, lower case

_PEOPLE = ["ana", "ben", "carla", "dev", "emma", "farid", "grace", "hugo", "ines", "jon", "kim", "leo", "mia", "noah"]
_THINGS = ["apples", "books", "coins", "marbles", "stamps", "pencils", "cards", "shells", "eggs", "boxes"]


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _equation(rng: random.Random) -> str:
    # Mostly small operands: the answers are then facts a small model can learn, where random
    # three-digit operands would be noise that no model can predict.
    op = rng.choice("+-*")
    if op == "+":
        a, b = _number(rng, rng.choice((1, 1, 2, 2, 3))), _number(rng, rng.choice((1, 1, 2)))
        return f"{a} + {b} = {a + b}"
    if op == "-":
        a, b = _number(rng, rng.choice((1, 2, 2, 3))), _number(rng, rng.choice((1, 1, 2)))
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    a, b = _number(rng, rng.choice((1, 1, 1, 2))), rng.randint(2, 9)
    return f"{a} * {b} = {a * b}"


def _column_addition(rng: random.Random) -> str:
    a, b = _number(rng, rng.randint(2, 3)), _number(rng, rng.randint(2, 3))
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry, out = [], 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        expr = f"{x} + {y}" + (" + 1" if carry else "")
        new_carry = s // 10
        steps.append(f"{expr} = {s}, write {s % 10}" + (", carry 1" if new_carry else ""))
        out.append(s % 10)
        carry = new_carry
    if carry:
        steps.append("write the carry 1")
    return f"add {a} and {b}: " + "; ".join(steps) + f". so {a} + {b} = {a + b}."


def _word_problem(rng: random.Random) -> str:
    who, thing = rng.choice(_PEOPLE), rng.choice(_THINGS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return (f"{who} has {a} {thing} and gets {b} more. how many {thing} does {who} have now? "
                f"{a} + {b} = {a + b}. the answer is {a + b}.")
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        return (f"{who} has {a} {thing} and gives away {b}. how many {thing} are left? "
                f"{a} - {b} = {a - b}. the answer is {a - b}.")
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return (f"{who} buys {a} bags with {b} {thing} in each bag. how many {thing} is that? "
                f"{a} * {b} = {a * b}. the answer is {a * b}.")
    b, q = rng.randint(2, 9), rng.randint(2, 12)
    return (f"{who} shares {b * q} {thing} equally among {b} friends. how many {thing} does each friend get? "
            f"{b * q} / {b} = {q}. the answer is {q}.")


def _arithmetic_doc(rng: random.Random) -> str:
    # Bare equations are mostly unpredictable operands for every model; worked additions and
    # word problems carry the structure a specialist learns, so they make up 4/5 of the domain.
    kind = rng.choices((0, 1, 2), weights=(1, 2, 2))[0]
    n = rng.randint(1, 99)
    target = rng.randint(MIN_DOC_CHARS + 50, MAX_ARITHMETIC_DOC_CHARS - 200)
    if kind == 0:
        head, item, sep = f"worksheet {n}: equations", _equation, "\n"
    elif kind == 1:
        head, item, sep = f"worksheet {n}: column addition", _column_addition, "\n"
    else:
        head, item, sep = f"worksheet {n}: word problems", _word_problem, "\n"
    lines = [head]
    while sum(len(x) + 1 for x in lines) < target:
        lines.append(item(rng))
    return sep.join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# mixed: documents that switch domain inside (held out: no model is trained on them)

# Prose for mixed documents comes from the docstrings of these stdlib packages: neither the demo
# nor the training prose reads them (both read top-level modules only), so no prose paragraph of
# a mixed document is in any other corpus (paragraphs repeated at top level are dropped as well).
_MIXED_PROSE_PACKAGES = (
    "asyncio", "concurrent", "email", "html", "http", "importlib", "json", "logging", "multiprocessing",
    "urllib", "wsgiref", "xmlrpc", "zoneinfo",
)
_MIXED_PARAGRAPH_CHARS = (100, 320)
_SENTENCE_END = re.compile(r"(?<=[a-z)][.?!])\s+(?=[A-Z])")


def _prose_paragraph_ok(p: str) -> bool:
    """A paragraph of plain sentences: no code, markup, tables or doctest lines."""
    lo, hi = _MIXED_PARAGRAPH_CHARS
    return (lo <= len(p) <= hi and p[0].isupper() and p.endswith(".") and ">>>" not in p
            and not any(line.startswith(" ") for line in p.splitlines())
            and not re.search(r"[{}\[\]|=\\`*#:]|\"\"\"", p))


@lru_cache(maxsize=1)
def _mixed_prose_paragraphs() -> tuple[str, ...]:
    """Plain-sentence paragraphs, one line each, that occur in no demo or training prose document."""
    root = _stdlib_root()
    seen_elsewhere = {" ".join(para.split())
                      for _, docs in _stdlib_docstrings() for d in docs for para in d.split("\n\n")}
    out: dict[str, None] = {}
    for package in _MIXED_PROSE_PACKAGES:
        files = sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []
        for path in files:
            if {"test", "tests"} & set(path.relative_to(root).parts[:-1]):
                continue
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            for node in _documented_nodes(tree):
                doc = ast.get_docstring(node, clean=True)
                if not doc or not doc.isascii():
                    continue
                for para in doc.split("\n\n"):
                    para = para.strip()
                    flat = " ".join(para.split())
                    if para and _prose_paragraph_ok(para) and flat not in seen_elsewhere:
                        out[flat] = None
    return tuple(out)


def _comment_block(text: str, indent: str = "") -> str:
    return "".join(f"{indent}# {line}\n" for line in textwrap.wrap(text, 76 - len(indent)))


def _mixed_code_with_prose(rng: random.Random, prose: list[str]) -> str:
    """A generated module whose docstring and comments are prose paragraphs."""
    module = _CodeModule(rng)
    functions = [getattr(module, name)()[0] for name in rng.sample(module.TEMPLATES, rng.randint(1, 2))]
    intro = textwrap.fill(prose.pop(), 76)
    body = module.header().replace("from dataclasses import dataclass\n", "", 1).lstrip("\n")
    parts = [f'"""{intro}\n"""\nfrom dataclasses import dataclass\n\n\n{body}']
    for i, src in enumerate(functions):
        parts.append((_comment_block(prose.pop()) if i == 0 else "") + src)
    return "\n\n".join(parts)


def _mixed_prose_with_arithmetic(rng: random.Random, prose: list[str]) -> str:
    """Prose paragraphs with worked arithmetic (word problems, sums, column additions) between sentences."""
    items = (_word_problem, _column_addition, lambda r: f"for example, {_equation(r)}.")
    paragraphs = []
    for _ in range(rng.randint(1, 2)):
        sentences = _SENTENCE_END.split(prose.pop())
        for _ in range(rng.randint(1, 2)):
            sentences.insert(rng.randint(1, len(sentences)), rng.choice(items)(rng))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def _mixed_prose_with_code(rng: random.Random, prose: list[str]) -> str:
    """A prose paragraph, a function that illustrates it, and another paragraph."""
    module = _CodeModule(rng)
    src = getattr(module, rng.choice(module.TEMPLATES))()[0]
    return f"{textwrap.fill(prose.pop(), 76)}\n\n{src}\n{textwrap.fill(prose.pop(), 76)}\n"


_MIXED_KINDS = (_mixed_code_with_prose, _mixed_prose_with_arithmetic, _mixed_prose_with_code)


def _mixed_docs(rng: random.Random) -> Iterator[str]:
    """Mixed documents until the prose paragraphs run out; each paragraph is used once."""
    pool = list(_mixed_prose_paragraphs())
    rng.shuffle(pool)
    while len(pool) >= 4:
        doc = rng.choice(_MIXED_KINDS)(rng, pool)  # takes (pops) at most 2 paragraphs
        if MIN_DOC_CHARS <= len(doc) <= MAX_MIXED_DOC_CHARS and doc.isascii():
            yield doc


# ----------------------------------------------------------------------------------------------
# streams

_GENERATORS: dict[str, Callable[[random.Random], str]] = {"code": _code_doc, "arithmetic": _arithmetic_doc}


def _check_domain(domain: str, domains: tuple[str, ...] = BUILTIN_DOMAINS) -> None:
    if domain not in domains:
        raise ValueError(f"unknown demo domain {domain!r}; expected one of {list(domains)}")


def _documents(domain: str, *, seed: int, demo: bool) -> Iterator[str]:
    """An endless (prose, mixed: pool-sized) stream of documents of one domain, demo or training side."""
    _check_domain(domain, BUILTIN_DOMAINS if demo else DOMAINS)
    stream = "demo" if demo else "train"
    rng = random.Random(f"llm-fusion:{stream}:{domain}:{seed}")
    if domain == "mixed":
        yield from _mixed_docs(rng)
        return
    if domain == "prose":
        yield from _prose_docs(rng, demo)
        return
    gen = _GENERATORS[domain]
    while True:
        doc = gen(rng)
        if MIN_DOC_CHARS <= len(doc) <= MAX_DOC_CHARS and doc.isascii() and _is_demo(f"{domain}:{doc}") == demo:
            yield doc


def _take(docs: Iterator[str], n_chars: int) -> list[str]:
    out, total = [], 0
    for doc in docs:
        if total >= n_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def demo_documents(domain: str, *, seed: int = 0, scale: float = 1.0) -> list[str]:
    """The demo (fusion) corpus of one domain: about scale x DEMO_CHARS_PER_DOMAIN[domain] characters."""
    _check_domain(domain)
    return _take(_documents(domain, seed=seed, demo=True), int(DEMO_CHARS_PER_DOMAIN[domain] * scale))


def write_demo_corpus(out_dir: Path, *, seed: int = 0, scale: float = 1.0,
                      domains: Sequence[str] = DOMAINS) -> dict[str, Path]:
    """Write `<domain>.jsonl` (lines of {"text": ...}) under out_dir for each of `domains`:
    by default prose, code and arithmetic; "mixed" (BUILTIN_DOMAINS) on request.

    Deterministic for (seed, scale) on a given Python version. Returns {domain: path}.
    Raises ValueError when scale is not positive or a domain is unknown.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    for domain in domains:
        _check_domain(domain)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for domain in domains:
        path = out_dir / f"{domain}.jsonl"
        body = "".join(json.dumps({"text": d}, ensure_ascii=True) + "\n" for d in demo_documents(domain, seed=seed, scale=scale))
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(path)
        paths[domain] = path
    return paths


def specialist_training_texts(domain: str, *, seed: int, n_chars: int) -> list[str]:
    """Training documents of `domain`, about n_chars in all, never a document of any demo corpus.

    Prose is finite (the training side of the stdlib docstrings, a few MB): a larger request
    returns all of it. Raises ValueError for an unknown domain, and for "mixed", which is held
    out: nothing is trained on it.
    """
    if domain in HELDOUT_DOMAINS:
        raise ValueError(f"demo domain {domain!r} is held out: it has no training texts")
    return _take(_documents(domain, seed=seed, demo=False), n_chars)


def builtin_corpus_version(domain: str) -> str:
    """The version of the generator of one builtin domain (what a cache of its text must be keyed by)."""
    _check_domain(domain)
    return MIXED_CORPUS_VERSION if domain == "mixed" else CORPUS_VERSION
