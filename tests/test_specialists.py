"""Recipe builds: registry, fingerprints, atomic and idempotent folders, loadable models of the right family."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_core import specialists
from fusion_core.specialists import (
    RECIPE_FILE, RECIPES, build_recipe, measure_bits_per_byte, read_build_record, recipe_fingerprint,
)
from fusion_core.tokenization import encode_document

TINY_SPECIALIST = {
    "train_chars": 30_000, "tokenizer_chars": 30_000, "vocab_size": 300, "hidden": 32, "layers": 1,
    "heads": 2, "intermediate": 64, "steps": 4, "batch_size": 2, "seq_len": 32, "warmup": 2, "threads": 1,
}
TINY_TARGET = {"tokenizer_chars": 8_000, "vocab_size": 400, "hidden": 32, "layers": 1, "heads": 2,
               "intermediate": 64, "threads": 1}
TINY = {"code_specialist": TINY_SPECIALIST, "arithmetic_specialist": TINY_SPECIALIST, "demo_target": TINY_TARGET}

# (pre-tokenizer class, model class) that each recipe's tokenizer family must have.
FAMILY = {
    "code_specialist": ("ByteLevel", "BPE"),
    "arithmetic_specialist": ("BertPreTokenizer", "WordPiece"),
    "demo_target": ("Metaspace", "BPE"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return {name: build_recipe(name, root / name, seed=0, options=TINY[name]) for name in FAMILY}


def test_registry_has_the_demo_recipes():
    assert {"code_specialist", "arithmetic_specialist", "demo_target"} <= set(RECIPES)


def test_unknown_recipe_and_option_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="known recipes.*code_specialist"):
        build_recipe("poetry_specialist", tmp_path / "x")
    with pytest.raises(ValueError, match="no option"):
        build_recipe("code_specialist", tmp_path / "x", options={"hiddn": 8})
    assert not (tmp_path / "x").exists()


def test_fingerprint_depends_on_seed_options_and_code_version(monkeypatch):
    base = recipe_fingerprint("code_specialist", 0, None)
    assert base == recipe_fingerprint("code_specialist", 0, {"hidden": RECIPES["code_specialist"].defaults["hidden"]})
    assert base != recipe_fingerprint("code_specialist", 1, None)
    assert base != recipe_fingerprint("code_specialist", 0, {"steps": 1})
    assert base != recipe_fingerprint("arithmetic_specialist", 0, None)
    monkeypatch.setattr(specialists, "RECIPE_CODE_VERSION", "test")
    assert base != recipe_fingerprint("code_specialist", 0, None)
    monkeypatch.undo()
    monkeypatch.setattr(specialists, "CORPUS_VERSION", "test")
    assert base != recipe_fingerprint("code_specialist", 0, None)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_built_folder_loads_with_the_required_tokenizer_family(built, name):
    path = built[name]
    tok = AutoTokenizer.from_pretrained(path)
    backend = tok.backend_tokenizer
    pre, model_type = FAMILY[name]
    assert type(backend.pre_tokenizer).__name__ == pre
    assert type(backend.model).__name__ == model_type
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert (path / "model.safetensors").is_file()
    enc = encode_document(tok, "def total(xs):\n    return 347 + 589\n")
    logits = model(input_ids=torch.as_tensor(enc.ids)[None]).logits
    assert logits.shape == (1, len(enc), len(tok))
    assert torch.isfinite(logits).all()
    record = read_build_record(path)
    assert record["fingerprint"] == recipe_fingerprint(name, 0, TINY[name])
    assert not list(path.parent.glob(f"{name}.partial-*"))


def test_wordpiece_specialist_has_no_unknown_tokens_on_ascii(built):
    tok = AutoTokenizer.from_pretrained(built["arithmetic_specialist"])
    ids = tok("Quixotic ZEBRAS jump; f(x) = {q: 7} ~ `zz`", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


def test_arithmetic_vocabulary_reads_numbers_digit_by_digit(built):
    tok = AutoTokenizer.from_pretrained(built["arithmetic_specialist"])
    multi_digit = [t for t in tok.get_vocab() if sum(c.isdigit() for c in t) > 1]
    assert multi_digit == []
    assert tok.tokenize("add 347 and 58") == ["add", "3", "##4", "##7", "and", "5", "##8"]


def test_rebuild_is_a_no_op(built, monkeypatch):
    path = built["code_specialist"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete build must not be rebuilt")

    monkeypatch.setitem(specialists.RECIPES, "code_specialist",
                        specialists.Recipe("code_specialist", "", RECIPES["code_specialist"].defaults, fail))
    assert build_recipe("code_specialist", path, seed=0, options=TINY_SPECIALIST) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_builds_are_deterministic(built, tmp_path):
    again = build_recipe("arithmetic_specialist", tmp_path / "again", seed=0, options=TINY_SPECIALIST)
    first = built["arithmetic_specialist"]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_failed_build_leaves_nothing_taken_as_complete(tmp_path, monkeypatch):
    def crash(out, seed, options):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(specialists.RECIPES, "code_specialist",
                        specialists.Recipe("code_specialist", "", RECIPES["code_specialist"].defaults, crash))
    out = tmp_path / "code"
    with pytest.raises(RuntimeError, match="killed"):
        build_recipe("code_specialist", out, options=TINY_SPECIALIST)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_stale_folder_is_rebuilt(tmp_path):
    out = tmp_path / "target"
    out.mkdir()
    (out / "config.json").write_text("{}")  # no build record: an interrupted copy, not a build
    build_recipe("demo_target", out, options=TINY_TARGET)
    assert read_build_record(out)["recipe"] == "demo_target"
    other = dict(TINY_TARGET, hidden=16)
    build_recipe("demo_target", out, options=other)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16
    assert read_build_record(out)["fingerprint"] == recipe_fingerprint("demo_target", 0, other)


def test_measure_bits_per_byte_of_a_random_model_is_near_uniform(built):
    tok = AutoTokenizer.from_pretrained(built["demo_target"])
    texts = ["The quick brown fox jumps over the lazy dog.", "347 + 589 = 936\n"]
    bpb = measure_bits_per_byte(built["demo_target"], texts)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    uniform = n_tokens * np.log2(len(tok)) / sum(len(t) for t in texts)
    assert 0.7 * uniform < bpb < 1.3 * uniform
