"""The evaluation core: bundled lm-eval tasks, metric names, perplexity per domain."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusion_core.eval_tasks import BUNDLED_TAG, BUNDLED_TASKS, DATA_DIR, TEMPLATES_DIR, make_data, materialize_tasks
from fusion_core.evaluation import (
    LmEvalTaskError,
    _windows,
    evaluate_lm_eval,
    flatten_lm_eval_metrics,
    json_safe,
    perplexity_by_domain,
    sanitize_metric_name,
)


@dataclass
class Doc:  # the shape of fusion_core.data.Document
    id: str
    domain: str
    text: str


DOCS = [
    Doc("p1", "prose", "The quick brown fox jumps over the lazy dog. Knowledge fusion selects sources."),
    Doc("p2", "prose", "café naïve résumé — unicode text survives every tokenizer."),
    Doc("c1", "code", "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n"),
    Doc("a1", "arithmetic", "12 + 35 = 47\n7 * 8 = 56\n100 - 1 = 99\n"),
]


@pytest.fixture(scope="session")
def include_dir(tmp_path_factory) -> Path:
    return materialize_tasks(tmp_path_factory.mktemp("eval-tasks"))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- metric names

@pytest.mark.parametrize("raw, clean", [
    ("eval.fusion_code_mc.acc", "eval.fusion_code_mc.acc"),
    ("eval.t.exact_match.strict-match", "eval.t.exact_match.strict-match"),
    ("acc,none", "acc_none"),
    ("a b/c-d_e.f", "a b/c-d_e.f"),
    ("ppl.café.perplexity", "ppl.caf_.perplexity"),
    ("x:y(z)=1%", "x_y_z__1_"),
    ("/lead//double/trail/", "lead/double/trail"),
    ("a/./b/../c", "a/_/b/_/c"),
    ("", "_"),
    ("/", "_"),
])
def test_sanitize_metric_name(raw, clean):
    assert sanitize_metric_name(raw) == clean


def test_sanitized_names_pass_mlflow_validation():
    validation = pytest.importorskip("mlflow.utils.validation")
    long_a, long_b = "m" * 300 + "a", "m" * 300 + "b"
    names = ["acc,none", "ppl.café.perplexity", "a/./b/../c", "//", "x:y", long_a, long_b, "é" * 10]
    cleaned = [sanitize_metric_name(n) for n in names]
    for name in cleaned:
        validation._validate_metric_name(name)
        assert validation.validate_param_and_metric_name(name)
        assert len(name) <= 250
    assert sanitize_metric_name(long_a) != sanitize_metric_name(long_b)


def test_flatten_lm_eval_metrics():
    results = {
        "results": {
            "fusion_code_mc": {"alias": "fusion_code_mc", "acc,none": 0.5, "acc_stderr,none": 0.1,
                               "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A", "sample_len": 40},
            "fusion_arith_gen": {"alias": "fusion_arith_gen", "exact_match,strict-match": 0.75,
                                 "exact_match_stderr,strict-match": 0.05, "exact_match,flexible-extract": 0.8,
                                 "exact_match_stderr,flexible-extract": float("nan")},
            "weird task:1": {"bleu,none": 3, "flag,none": True},
        },
        "groups": {"my_group": {"acc,none": 0.4}, "fusion_code_mc": {"acc,none": 0.99}},
        "n-samples": {"fusion_code_mc": {"original": 40, "effective": 5}},
        "configs": {"fusion_code_mc": {"acc,none": 7.0}},
    }
    assert flatten_lm_eval_metrics(results) == {
        "eval.fusion_code_mc.acc": 0.5,
        "eval.fusion_code_mc.acc_stderr": 0.1,
        "eval.fusion_code_mc.acc_norm": 0.25,
        "eval.fusion_arith_gen.exact_match.strict-match": 0.75,
        "eval.fusion_arith_gen.exact_match_stderr.strict-match": 0.05,
        "eval.fusion_arith_gen.exact_match.flexible-extract": 0.8,
        "eval.weird task_1.bleu": 3.0,
        "eval.my_group.acc": 0.4,
        "eval.fusion_code_mc.n_samples": 5.0,
    }
    assert flatten_lm_eval_metrics({}) == {}


def test_lm_eval_records_merge_filters_per_item():
    from fusion_core.eval_items import lm_eval_records

    results = {"samples": {"gen": [
        {"doc_id": 0, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 1.0, "doc": {"q": "x"}},
        {"doc_id": 0, "filter": "flexible-extract", "metrics": ["exact_match"], "exact_match": 0.0},
        {"doc_id": 1, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 0.0},
        {"doc_id": 1, "filter": "flexible-extract", "metrics": ["exact_match"], "exact_match": 1.0},
    ], "mc": [{"doc_id": 3, "filter": "none", "metrics": ["acc", "acc_norm", "bleu"], "acc": True, "acc_norm": 0.0,
               "bleu": ["ref", "pred"]}]}}
    assert lm_eval_records("lm_eval:x", results) == [
        {"unit": "lm_eval:x", "kind": "question", "task": "eval.gen", "id": "0",
         "scores": {"exact_match.strict-match": 1.0, "exact_match.flexible-extract": 0.0}},
        {"unit": "lm_eval:x", "kind": "question", "task": "eval.gen", "id": "1",
         "scores": {"exact_match.strict-match": 0.0, "exact_match.flexible-extract": 1.0}},
        {"unit": "lm_eval:x", "kind": "question", "task": "eval.mc", "id": "3", "scores": {"acc": 1.0, "acc_norm": 0.0}},
    ]


def test_json_safe():
    import numpy as np

    out = json_safe({"a": float("nan"), "b": np.float32(0.5), "c": np.arange(3), 4: (1, float("inf")),
                      "f": len, "p": Path("/x"), "d": np.dtype("float32")})
    assert out == {"a": None, "b": 0.5, "c": [0, 1, 2], "4": [1, None], "f": "<builtin_function_or_method len>",
                   "p": "/x", "d": "float32"}
    json.dumps(out, allow_nan=False)


# ----------------------------------------------------------------------------- bundled data

def test_bundled_data_files_match_generator():
    files = make_data.build_all()
    assert sorted(files) == sorted(p.name for p in DATA_DIR.glob("*.jsonl"))
    for name, text in files.items():
        assert (DATA_DIR / name).read_text(encoding="utf-8") == text, f"{name} is stale: rerun make_data"


@pytest.mark.parametrize("task", sorted(BUNDLED_TASKS))
def test_bundled_data_valid(task):
    test = _read(DATA_DIR / f"{task}.test.jsonl")
    fewshot = _read(DATA_DIR / f"{task}.fewshot.jsonl")
    assert 40 <= len(test) <= 100 and len(fewshot) == make_data.FEWSHOT
    for row in test + fewshot:
        assert make_data.check_row(task, row) == [], row["id"]
    # one schema per task (lm-eval reads fields by name), ids unique, few-shot pool held apart
    assert len({tuple(sorted(r)) for r in test + fewshot}) == 1
    assert len({r["id"] for r in test + fewshot}) == len(test) + len(fewshot)
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in fewshot}


def test_code_items_are_checked_by_execution():
    row = _read(DATA_DIR / "fusion_code_mc.test.jsonl")[0]
    correct = row["choices"][row["answer"]]
    assert make_data.run_code_item(row, correct) is None
    assert make_data.run_code_item(row, "    return None") is not None
    loop = {**row, "prompt": "def spin():\n    n = 0\n", "suffix": "        n += 1\n", "test": "spin()"}
    assert "line budget" in make_data.run_code_item(loop, "    while True:", budget=1000)
    assert "longer than" in make_data.run_code_item({**loop, "suffix": ""}, "    while True: pass", seconds=0.5)
    # a wrong answer index or a false sum is reported
    assert make_data.check_row("fusion_code_mc", {**row, "answer": (row["answer"] + 1) % 4})
    arith = {"kind": "equation", "prompt": "2 + 2 =", "op": "+", "operands": [2, 2], "answer": "5"}
    assert make_data.check_row("fusion_arith_gen", arith)
    assert make_data.check_row("fusion_arith_mc", {**arith, "choices": ["4", "5"], "answer": 2})


def test_materialize_tasks(include_dir, tmp_path):
    import yaml
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    assert include_dir.is_absolute()
    for task in BUNDLED_TASKS:
        config = yaml.safe_load((include_dir / f"{task}.yaml").read_text())
        assert config["task"] == task and config["dataset_path"] == "json"
        for path in config["dataset_kwargs"]["data_files"].values():
            assert Path(path).is_absolute() and Path(path).is_file()
            assert Path(path).parent == include_dir / "data"
        # lm-eval's own loader reads back exactly the template, but for the data paths
        template = yaml.safe_load((TEMPLATES_DIR / f"{task}.yaml.tmpl").read_text())
        assert load_yaml(include_dir / f"{task}.yaml") == {**template, "dataset_kwargs": config["dataset_kwargs"]}
    manager = TaskManager(include_path=str(include_dir), include_defaults=False)
    assert set(BUNDLED_TASKS) | {BUNDLED_TAG} <= set(manager.all_tasks)
    # repeatable, and byte-identical wherever it is written
    again = materialize_tasks(include_dir)
    other = materialize_tasks(tmp_path / "elsewhere")
    for task in BUNDLED_TASKS:
        text = (again / f"{task}.yaml").read_text()
        assert text.replace(str(include_dir), "ROOT") == (other / f"{task}.yaml").read_text().replace(str(other), "ROOT")


# ----------------------------------------------------------------------------- perplexity

@pytest.mark.parametrize("n, max_length, stride", [(5, 8, 4), (8, 8, 4), (9, 8, 4), (30, 8, 3), (100, 16, 15), (17, 4, 1)])
def test_windows_score_every_target_once(n, max_length, stride):
    scored = []
    for start, end, skip in _windows(n, max_length, stride):
        assert 0 <= start < end <= n and end - start <= max_length
        scored += list(range(start + 1 + skip, end))
    assert scored == list(range(1, n))


@pytest.mark.parametrize("family", ["byte_level", "metaspace", "wordpiece"])
def test_perplexity_equals_direct_loss(tiny_models, family):
    import torch

    from fusion_core.models import load_causal_lm, load_tokenizer
    from fusion_core.tokenization import encode_document

    path = tiny_models[family]
    out = perplexity_by_domain(path, DOCS, batch_size=3)
    assert list(out) == ["arithmetic", "code", "prose", "all"]

    model, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    totals = {"tokens": 0, "bytes": 0, "nll": 0.0}
    for doc in DOCS:
        ids = torch.as_tensor(encode_document(tok, doc.text).ids)[None]
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        n_tokens, n_bytes = ids.shape[1] - 1, len(doc.text.encode("utf-8"))
        totals["tokens"] += n_tokens
        totals["bytes"] += n_bytes
        totals["nll"] += loss * n_tokens
        if doc.domain in ("code", "arithmetic"):  # one document each
            row = out[doc.domain]
            assert row["documents"] == 1 and row["tokens"] == n_tokens and row["bytes"] == n_bytes
            assert row["nll_per_token"] == pytest.approx(loss, abs=1e-5)
            assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
            assert row["bits_per_byte"] == pytest.approx(loss * n_tokens / (math.log(2) * n_bytes), rel=1e-5)
    everything = out["all"]
    assert everything["documents"] == len(DOCS) and everything["tokens"] == totals["tokens"]
    assert everything["bits_per_byte"] == pytest.approx(totals["nll"] / (math.log(2) * totals["bytes"]), rel=1e-5)
    assert everything["nll_per_token"] == pytest.approx(totals["nll"] / totals["tokens"], rel=1e-5)


def test_perplexity_windows_long_documents(tiny_models):
    path = tiny_models["byte_level"]
    long_doc = Doc("long", "prose", " ".join(d.text for d in DOCS) * 3)
    whole = perplexity_by_domain(path, [long_doc], max_length=512)["prose"]
    windowed = perplexity_by_domain(path, [long_doc], max_length=32, stride=16)["prose"]
    assert whole["tokens"] > 64 and windowed["tokens"] == whole["tokens"]
    assert math.isfinite(windowed["perplexity"])
    # a random model barely uses context: shorter windows give nearly the same loss
    assert windowed["nll_per_token"] == pytest.approx(whole["nll_per_token"], rel=0.05)


def test_perplexity_rejects_bad_input(tiny_models):
    path = tiny_models["byte_level"]
    with pytest.raises(ValueError, match="no non-empty documents"):
        perplexity_by_domain(path, [Doc("e", "prose", "")])
    with pytest.raises(ValueError, match="reserved"):
        perplexity_by_domain(path, [Doc("x", "all", "text")])


# ----------------------------------------------------------------------------- lm-eval

def test_unknown_task_fails_before_loading_the_model(include_dir, tmp_path):
    # the model folder does not exist: the task check must come first
    with pytest.raises(ValueError, match="no_such_task_xyz"):
        evaluate_lm_eval(tmp_path / "missing-model", ["fusion_prose_mc", "no_such_task_xyz"],
                         include_dir=include_dir, limit=2, batch_size=2)
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        evaluate_lm_eval(tmp_path / "missing-model", [], include_dir=include_dir, limit=2, batch_size=2)


@pytest.mark.slow
def test_registry_task_without_offline_data_names_the_task(tiny_models, include_dir):
    with pytest.raises(LmEvalTaskError, match="arithmetic_2da"):
        evaluate_lm_eval(tiny_models["byte_level"], ["arithmetic_2da"], include_dir=include_dir, limit=2,
                         batch_size=2)


def test_lm_eval_bundled_tasks_offline(tiny_models, include_dir):
    import torch

    from fusion_core.models import load_causal_lm, load_tokenizer
    from fusion_core.tokenization import start_token_id

    path = tiny_models["metaspace"]
    res = evaluate_lm_eval(path, [BUNDLED_TAG], include_dir=include_dir, limit=5, batch_size=4, log_samples=True)
    json.dumps(res, allow_nan=False)
    metrics = flatten_lm_eval_metrics(res)
    for task in ("fusion_prose_mc", "fusion_code_mc", "fusion_arith_mc"):
        assert 0.0 <= metrics[f"eval.{task}.acc"] <= 1.0 and f"eval.{task}.acc_norm" in metrics
        assert metrics[f"eval.{task}.n_samples"] == 5
    for flt in ("strict-match", "flexible-extract"):
        assert 0.0 <= metrics[f"eval.fusion_arith_gen.exact_match.{flt}"] <= 1.0

    # every context starts with the start token, as in all other stages: recompute one choice
    model, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    sample = res["samples"]["fusion_arith_mc"][0]
    context, continuation = sample["arguments"][1]
    ctx = [start_token_id(tok), *tok.encode(context, add_special_tokens=False)]
    whole = [start_token_id(tok), *tok.encode(context + continuation, add_special_tokens=False)]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    expected = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
    assert sample["resps"][1][0][0] == pytest.approx(expected, abs=1e-4)


def test_evaluate_units_runs_each_unit_on_one_loaded_model(tiny_models, include_dir):
    from fusion_core.evaluation_suite import EvalSettings, evaluate_units

    settings = EvalSettings(tasks=("fusion_arith_mc",), limit=3, batch_size=4, seed=1, max_length=64)
    out = evaluate_units(tiny_models["wordpiece"], ["lm_eval:fusion_arith_mc", "perplexity"], settings,
                         documents=DOCS, include_dir=include_dir)
    assert all(o.ok for o in out.values())
    ppl = out["perplexity"]
    assert set(ppl.details) == {"prose", "code", "arithmetic", "all"}
    for domain in ("prose", "code", "arithmetic", "all"):
        for key in ("perplexity", "bits_per_byte", "nll_per_token", "tokens", "documents"):
            assert f"ppl.{domain}.{key}" in ppl.metrics
    # Per document: its bits and bytes, so that a set's bits per byte is sum bits / sum bytes.
    assert [(r["id"], r["domain"], r["bytes"]) for r in ppl.items] == [
        (d.id, d.domain, len(d.text.encode("utf-8"))) for d in DOCS]
    for domain in ("prose", "code", "arithmetic"):
        rows = [r for r in ppl.items if r["domain"] == domain]
        assert sum(r["bits"] for r in rows) / sum(r["bytes"] for r in rows) == pytest.approx(
            ppl.metrics[f"ppl.{domain}.bits_per_byte"], rel=1e-9)
        assert sum(r["tokens"] for r in rows) == ppl.metrics[f"ppl.{domain}.tokens"]
    task = out["lm_eval:fusion_arith_mc"]
    assert task.details["results"]["fusion_arith_mc"]["acc,none"] == task.metrics["eval.fusion_arith_mc.acc"]
    assert all(k.startswith("eval.fusion_arith_mc.") for k in task.metrics)
    # Per question: lm-eval's own 0/1 per sample, agreeing with its aggregate; prompts not kept.
    assert "samples" not in task.details and [r["id"] for r in task.items] == ["0", "1", "2"]
    for metric in ("acc", "acc_norm"):
        values = [r["scores"][metric] for r in task.items]
        assert set(values) <= {0.0, 1.0}
        assert sum(values) / 3 == pytest.approx(task.metrics[f"eval.fusion_arith_mc.{metric}"])
    with pytest.raises(ValueError, match="not in the settings"):
        evaluate_units(tiny_models["wordpiece"], ["humaneval"], settings)
