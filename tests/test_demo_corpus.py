"""Data tests for the demo corpus: determinism, shape, correctness, and no leakage into training text."""
import json
import re

import pytest

from fusion_core.demo_corpus import (
    BUILTIN_DOMAINS, DEMO_CHARS_PER_DOMAIN, DOMAINS, MAX_DOC_CHARS, MAX_MIXED_DOC_CHARS, MIN_DOC_CHARS,
    demo_documents, specialist_training_texts, write_demo_corpus,
)


def _read(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), seed=0, scale=0.2)


def test_corpus_is_byte_identical_across_writes(small_corpus, tmp_path):
    again = write_demo_corpus(tmp_path, seed=0, scale=0.2)
    assert set(again) == set(DOMAINS) == set(small_corpus)
    for domain in DOMAINS:
        assert again[domain].read_bytes() == small_corpus[domain].read_bytes()
        assert again[domain].name == f"{domain}.jsonl"


def test_seed_changes_the_corpus(small_corpus, tmp_path):
    other = write_demo_corpus(tmp_path, seed=1, scale=0.2)
    for domain in DOMAINS:
        assert other[domain].read_bytes() != small_corpus[domain].read_bytes()


def test_documents_are_ascii_text_of_the_right_size(small_corpus):
    for domain, path in small_corpus.items():
        docs = _read(path)
        assert docs, domain
        total = sum(map(len, docs))
        budget = 0.2 * DEMO_CHARS_PER_DOMAIN[domain]
        assert budget <= total <= budget + MAX_DOC_CHARS, (domain, total)
        for doc in docs:
            assert doc.isascii()
            assert MIN_DOC_CHARS <= len(doc) <= MAX_DOC_CHARS, (domain, len(doc))


def test_scale_one_is_30_to_60_kb_per_domain():
    for domain in BUILTIN_DOMAINS:
        total = sum(map(len, demo_documents(domain, seed=0)))
        assert 30_000 <= total <= 60_000, (domain, total)


def test_generated_code_runs_and_its_tests_pass():
    for doc in demo_documents("code", seed=3, scale=0.3):
        namespace: dict = {}
        exec(compile(doc, "<generated>", "exec"), namespace)  # noqa: S102 - our own generator's output
        for name, value in namespace.items():
            if name.startswith("test_"):
                value()


def test_arithmetic_answers_are_correct():
    # every "x op y [op z] = w" in the text, e.g. "3 + 9 + 1 = 13" in a column addition
    eq = re.compile(r"(?<![\d+*/-] )\b((?:\d+ [-+*/] )+\d+) = (\d+)")
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    checked = 0
    for doc in demo_documents("arithmetic", seed=5, scale=0.5):
        assert doc == doc.lower()
        for expr, result in eq.findall(doc):
            parts = expr.split(" ")
            value = int(parts[0])
            for op, operand in zip(parts[1::2], parts[2::2]):
                value = ops[op](value, int(operand))
            assert value == int(result), (expr, result)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("domain", DOMAINS)
def test_training_texts_never_contain_a_demo_document(domain):
    train = specialist_training_texts(domain, seed=0, n_chars=150_000)
    assert sum(map(len, train)) >= 100_000
    train_set = set(train)
    for seed in (0, 1):
        demo = demo_documents(domain, seed=seed, scale=0.5)
        assert not train_set.intersection(demo)


def test_training_texts_are_deterministic_and_seeded():
    a = specialist_training_texts("code", seed=0, n_chars=20_000)
    assert a == specialist_training_texts("code", seed=0, n_chars=20_000)
    assert a != specialist_training_texts("code", seed=1, n_chars=20_000)


def test_unknown_domain_is_rejected():
    with pytest.raises(ValueError, match="unknown demo domain"):
        specialist_training_texts("poetry", seed=0, n_chars=10)


# ---------------------------------------------------------------- mixed: held out, domains switch inside

_EQUATION = re.compile(r"\b\d+ [-+*/] \d+ = \d+")


def _flat(text):
    """Whitespace collapsed and comment markers dropped: prose reads the same in a docstring, a comment or a line."""
    return " ".join(w for w in text.split() if w != "#")


@pytest.fixture(scope="module")
def mixed():
    return demo_documents("mixed", seed=0)


def test_mixed_documents_hold_prose_and_code_or_arithmetic(mixed):
    from fusion_core.demo_corpus import _SENTENCE_END, _mixed_prose_paragraphs

    openings = [_SENTENCE_END.split(p)[0] for p in _mixed_prose_paragraphs()]
    kinds = set()
    for doc in mixed:
        assert doc.isascii() and MIN_DOC_CHARS <= len(doc) <= MAX_MIXED_DOC_CHARS
        flat = _flat(doc)
        assert any(o in flat for o in openings), doc  # prose ...
        code, arithmetic = re.search(r"^def \w+\(", doc, re.M), _EQUATION.search(doc)
        assert code or arithmetic, doc  # ... and another domain, in one document
        kinds.add("module" if doc.startswith('"""') else "code" if code else "arithmetic")
        if doc.startswith('"""'):  # generated code with prose docstring and comments still runs
            exec(compile(doc, "<mixed>", "exec"), {})  # noqa: S102 - our own generator's output
    assert kinds == {"module", "code", "arithmetic"}
    assert 40 <= len(mixed) <= 90  # a few dozen documents for each of validation and test


def test_mixed_is_deterministic_and_seeded(mixed):
    assert demo_documents("mixed", seed=0) == mixed
    assert demo_documents("mixed", seed=1, scale=0.3) != mixed[: len(demo_documents("mixed", seed=1, scale=0.3))]
    assert demo_documents("mixed", seed=0, scale=0.3) == mixed[: len(demo_documents("mixed", seed=0, scale=0.3))]


def test_mixed_repeats_no_training_or_demo_text(mixed):
    from fusion_core.demo_corpus import _mixed_prose_paragraphs

    prose = [_flat(t) for t in specialist_training_texts("prose", seed=0, n_chars=10**8)]
    prose += [_flat(t) for t in demo_documents("prose", seed=0, scale=100)]  # all of each: prose is finite
    other = "\n".join(prose)
    assert not [p for p in _mixed_prose_paragraphs() if p in other]
    generated = set()
    for domain in ("code", "arithmetic"):
        generated.update(specialist_training_texts(domain, seed=0, n_chars=100_000))
        generated.update(demo_documents(domain, seed=0))
    assert not generated.intersection(mixed)
    assert not any(g in m for g in generated for m in mixed)


def test_mixed_is_held_out_of_training_texts_and_written_on_request(tmp_path):
    with pytest.raises(ValueError, match="held out"):
        specialist_training_texts("mixed", seed=0, n_chars=10)
    paths = write_demo_corpus(tmp_path, seed=0, scale=0.2, domains=("mixed",))
    assert list(paths) == ["mixed"] and [p.name for p in tmp_path.iterdir()] == ["mixed.jsonl"]
    assert _read(paths["mixed"]) == demo_documents("mixed", seed=0, scale=0.2)
    with pytest.raises(ValueError, match="unknown demo domain"):
        write_demo_corpus(tmp_path, domains=("poetry",))
