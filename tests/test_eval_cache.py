"""Evaluation results in MLflow are reused only for the identical (model fingerprint, unit, settings)."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fusion_core.evaluation import materialize_tasks
from fusion_core.evaluation_suite import EvalSettings, model_fingerprint, unit_keys
from tasks.eval_cache import CACHE_TAG, EvalSubject, evaluate_subject


class Doc:
    def __init__(self, domain: str, text: str):
        self.domain, self.text = domain, text


DOCS = [Doc("prose", "The quick brown fox jumps over the lazy dog."), Doc("code", "def f(x):\n    return x + 1\n")]


@pytest.fixture()
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("cache", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, exp


@pytest.fixture()
def twin_models(tmp_path, tiny_models) -> tuple[Path, Path]:
    """The same tiny model twice, the second with one weight changed: same files, same sizes."""
    import torch

    from fusion_core.models import load_causal_lm, load_tokenizer

    a = tmp_path / "a"
    shutil.copytree(tiny_models["byte_level"], a)
    model = load_causal_lm(a)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    b = tmp_path / "b"
    model.save_pretrained(b)
    load_tokenizer(a).save_pretrained(b)
    model = load_causal_lm(b)  # b as this library saves it; a rewritten alike so only the weight differs
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] -= 1.0
    shutil.rmtree(a)
    model.save_pretrained(a)
    load_tokenizer(b).save_pretrained(a)
    return a, b


def _evaluate(store, path: Path, settings: EvalSettings, label: str, include: Path | None = None):
    uri, exp = store
    keys = unit_keys(settings, documents_key="docs-v1")
    return evaluate_subject(EvalSubject(label, path, "reference"), settings, keys, experiment_id=exp,
                            tracking_uri=uri, documents=DOCS, include_dir=include), keys


def test_results_are_reused_only_for_the_identical_model_and_settings(store, twin_models):
    a, b = twin_models
    sizes = lambda p: sorted((f.name, f.stat().st_size) for f in p.iterdir())  # noqa: E731
    assert sizes(a) == sizes(b) and model_fingerprint(a) != model_fingerprint(b)
    settings = EvalSettings(perplexity=True, batch_size=2, max_length=32)

    first, keys = _evaluate(store, a, settings, "a")
    assert first.computed == ["perplexity"] and not first.reused
    assert [(r["domain"], r["bytes"]) for r in first.items["perplexity"]] == [
        (d.domain, len(d.text.encode())) for d in DOCS]
    again, _ = _evaluate(store, a, settings, "a again")
    assert again.reused == {"perplexity": first.run_id} and not again.computed
    assert again.metrics == first.metrics
    assert again.items == first.items  # the per-item results come back with a reused unit

    # Same shape, other bytes: computed, and its numbers differ.
    other, _ = _evaluate(store, b, settings, "b")
    assert other.computed == ["perplexity"] and not other.reused
    assert other.metrics["ppl.all.nll_per_token"] != first.metrics["ppl.all.nll_per_token"]

    # Same model, other settings (a unit key changes): computed again.
    longer, _ = _evaluate(store, a, replace(settings, max_length=16), "a short windows")
    assert longer.computed == ["perplexity"]
    assert unit_keys(replace(settings, max_length=16), documents_key="docs-v1") != keys
    assert unit_keys(settings, documents_key="docs-v2") != keys
    assert unit_keys(replace(settings, split="test"), documents_key="docs-v1")["perplexity"] != keys["perplexity"]


def test_held_out_perplexity_reads_the_configured_split(tmp_path):
    from fusion_core.config import EvaluationConfig
    from fusion_core.data import Document, write_documents
    from fusion_core.errors import FusionError
    from tasks.evaluate import _held_out_documents

    write_documents(tmp_path / "validation.jsonl", [Document("v1", "prose", "validation text")])
    write_documents(tmp_path / "test.jsonl", [Document("t1", "mixed", "test text")])
    assert EvaluationConfig().split == "validation"
    settings = EvalSettings.from_config(EvaluationConfig(split="test"), device="cpu", seed=0, max_length=32)
    assert settings.split == "test"
    assert [d.id for d in _held_out_documents(tmp_path, settings.split)] == ["t1"]
    assert [d.id for d in _held_out_documents(tmp_path, "validation")] == ["v1"]
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(FusionError, match="no test.jsonl"):
        _held_out_documents(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        EvalSettings(split="train")


def test_a_failed_unit_is_counted_and_never_cached(store, tiny_models, tmp_path):
    """A task whose data cannot be reached offline fails alone; the others are computed and cached."""
    from mlflow import MlflowClient

    include = materialize_tasks(tmp_path / "tasks")
    settings = EvalSettings(tasks=("arithmetic_2da", "fusion_arith_mc"), limit=2, batch_size=2, max_length=32)
    path = tiny_models["wordpiece"]
    res, keys = _evaluate(store, path, settings, "w", include)
    assert set(res.failures) == {"lm_eval:arithmetic_2da"}
    assert "arithmetic_2da" in res.failures["lm_eval:arithmetic_2da"]
    assert sorted(res.computed) == ["lm_eval:fusion_arith_mc", "perplexity"]
    tags = MlflowClient(store[0]).get_run(res.run_id).data.tags
    assert CACHE_TAG + keys["lm_eval:arithmetic_2da"] not in tags
    assert tags["evalfailed.lm_eval_arithmetic_2da"].startswith(res.failures["lm_eval:arithmetic_2da"][:40])
    again, _ = _evaluate(store, path, settings, "w again", include)
    assert set(again.reused) == {"lm_eval:fusion_arith_mc", "perplexity"}
    assert set(again.failures) == {"lm_eval:arithmetic_2da"}  # tried again, failed again


def test_a_record_this_code_did_not_write_is_not_a_result(store, tiny_models):
    """A cache tag whose value is not a complete record is ignored (computed instead)."""
    import mlflow

    settings = EvalSettings(perplexity=True, batch_size=2, max_length=32)
    keys = unit_keys(settings, documents_key="docs-v1")
    path = tiny_models["wordpiece"]
    with mlflow.start_run(experiment_id=store[1], tags={"model_fingerprint": model_fingerprint(path),
                                                         CACHE_TAG + keys["perplexity"]: "{\"unit\": \"perpl"}):
        pass
    res, _ = _evaluate(store, path, settings, "w")
    assert res.computed == ["perplexity"]
