"""`fusion reproduce`, `fusion compare` and `fusion promote` on the tiny pipeline, end to end."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import write_tiny_pipeline
from flows.cli import app

VARIANTS = ["clm", "single:bytes", "single:words", "min_ce", "avg_ce", "adaptive"]


@pytest.mark.slow
def test_reproduce_then_compare_and_promote(tmp_path, tiny_models, prefect_harness):
    from mlflow import MlflowClient

    path = write_tiny_pipeline(tmp_path, tiny_models, **{"evaluation.references": ["target", "clm", "single"]})
    runner = CliRunner()
    args = ["reproduce", str(path), "--json"] + [a for v in VARIANTS for a in ("--variant", v)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    runs = out["results"]
    # References first; stages 1-3 computed by the first run only, shared by all the others.
    assert [r["variant"] for r in runs] == VARIANTS
    assert {"prepare_data", "align_vocabularies", "teacher_inference"} <= set(runs[0]["computed"])
    assert all(set(r["computed"]) <= {"fusion_training", "evaluate"} for r in runs[1:])
    # Every variant's interference is measured against the one reference set, per unit, with intervals.
    inter = out["summary"]["interference"]
    for v in VARIANTS:
        assert inter[v]["references"] == ["clm", "single:bytes", "single:words"]
        for unit in ("bpb", "acc"):
            e = inter[v]["units"][unit]
            assert 0 <= e["lo"] <= e["value"] <= e["hi"]
    assert set(out["summary"]["reductions"]) == {"adaptive vs avg_ce", "adaptive vs min_ce"}
    assert set(out["summary"]["reductions"]["adaptive vs avg_ce"]) == {"bpb", "acc"}
    report = open(out["report"]).read()
    assert "## Knowledge interference" in report and "## Interference reduction of adaptive" in report

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'workspace' / 'mlflow' / 'mlflow.db'}")
    parent = client.get_run(out["run_id"])
    assert parent.data.tags["reproduce"] == "true" and "adaptive.interference.bpb" in parent.data.metrics
    assert "adaptive.interference.acc.hi" in parent.data.metrics
    assert sorted(a.path for a in client.list_artifacts(out["run_id"], "report")) == [
        "report/comparison.json", "report/comparison.md", "report/comparison.png"]
    for r in runs:  # each pipeline run is nested under the reproduce run
        assert client.get_run(r["run_id"]).data.tags["mlflow.parentRunId"] == out["run_id"]
    # The adaptive run's evaluate stage has the per-run report and found every reference.
    adaptive = runs[VARIANTS.index("adaptive")]
    evaluate_run = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{adaptive['run_id']}' and tags.stage = 'evaluate'")[0]
    assert evaluate_run.data.tags["missing_references"] == "none"
    assert {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "report")} == {
        "report/evaluation.md", "report/evaluation.json", "report/evaluation.png"}
    labels = {r.data.tags["model_label"] for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{evaluate_run.info.run_id}'")}
    assert labels == {"candidate", "target", "clm", "single:bytes", "single:words"}
    # The clm model was evaluated once, as the candidate of its own run; every later run that
    # evaluated it as a reference reused all its units (same content fingerprint, other label).
    fp = client.search_runs([parent.info.experiment_id], "tags.model_label = 'clm'")[0].data.tags["model_fingerprint"]
    evals = client.search_runs([parent.info.experiment_id], f"tags.model_fingerprint = '{fp}'")
    computing = [r for r in evals if any(k.startswith("evalcache.") for k in r.data.tags)]
    assert len(evals) == len(VARIANTS) and len(computing) == 1  # its own run, then the 5 others
    assert computing[0].data.tags["model_label"] == "candidate"

    # compare: versions side by side, the best value per row marked, as JSON, markdown and HTML.
    res = runner.invoke(app, ["compare", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    compared = json.loads(res.stdout)
    assert len(compared["rows"]) == len(VARIANTS) and "interference.bpb" not in compared["metrics"]  # not shared by refs
    assert any(m.startswith("ppl.") for m in compared["metrics"])
    res = runner.invoke(app, ["compare", str(path), "--runs", "--format", "json"])
    assert res.exit_code == 0, res.output
    pipeline_runs = json.loads(res.stdout)["rows"]  # the experiment's pipeline runs, not the reproduce run
    assert sorted(r["run_id"] for r in pipeline_runs) == sorted(r["run_id"] for r in runs)
    md = tmp_path / "cmp.md"
    res = runner.invoke(app, ["compare", str(path), "--format", "markdown", "--out", str(md)])
    assert res.exit_code == 0, res.output
    assert "★" in md.read_text() and md.with_suffix(".png").stat().st_size > 0
    html = tmp_path / "cmp.html"
    assert runner.invoke(app, ["compare", str(path), "--format", "html", "--out", str(html)]).exit_code == 0
    assert "<table>" in html.read_text() and 'class="best"' in html.read_text()

    # With a budget, a version whose interference was never measured is refused: the clm run
    # came first, before the single-source references it is compared with.
    res = runner.invoke(app, ["promote", str(path), "--version", runs[0]["version"], "--set",
                              "evaluation.interference_budget=0.5"])
    assert res.exit_code == 3 and "no measured interference" in res.output, res.output
    # promote: the champion moves only to a version that beats it on the primary metric.
    by_bpb = sorted(compared["rows"], key=lambda r: r["metrics"]["ppl.all.bits_per_byte"])
    best, middle, worst = by_bpb[0]["version"], by_bpb[len(by_bpb) // 2]["version"], by_bpb[-1]["version"]
    no_budget = ["--set", "evaluation.interference_budget=null"]
    res = runner.invoke(app, ["promote", str(path), "--version", worst, *no_budget])
    assert res.exit_code == 0 and "no champion yet" in res.output, res.output
    res = runner.invoke(app, ["promote", str(path), "--version", best, *no_budget])
    assert res.exit_code == 0 and "beats champion" in res.output, res.output
    res = runner.invoke(app, ["promote", str(path), "--version", middle, *no_budget])
    assert res.exit_code == 3 and "does not beat champion" in res.output, res.output
    name = compared["rows"][0]["name"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == best
    assert client.get_model_version(name, middle).tags["promotion.decision"] == "refused"


def test_summarise_measures_interference_from_the_runs_items(tmp_path):
    """The sweep's interference comes from every run's items.jsonl: seed means before the best of
    the one reference set, per unit, with intervals over seeds and items."""
    from fusion_core.eval_items import write_items
    from flows.reproduce import render_markdown, summarise

    # Accuracy per question and seed (2 seeds): single:x 0.75, 0.5 (mean 0.625); noisy single:y
    # 1.0, 0.0 (mean 0.5); avg_ce 0.5, 0.5. Bits per byte: single:x 1.0, avg_ce 0.9 (both seeds).
    acc = {"single:x": [(1, 1, 1, 0), (1, 1, 0, 0)], "single:y": [(1, 1, 1, 1), (0, 0, 0, 0)],
           "avg_ce": [(1, 1, 0, 0), (1, 0, 1, 0)], "adaptive": [(1, 1, 1, 0), (1, 0, 1, 0)]}
    bits = {"single:x": (100, 300), "single:y": (120, 360), "avg_ce": (90, 270), "adaptive": (100, 300)}
    results = []
    for seed in (0, 1):
        for variant in acc:
            records = [{"unit": "perplexity", "kind": "document", "id": d, "domain": "code", "bits": b, "bytes": n,
                        "tokens": 1} for d, b, n in zip(("d1", "d2"), bits[variant], (100, 300))]
            records += [{"unit": "lm_eval:qa", "kind": "question", "task": "eval.qa", "id": f"q{k}",
                         "scores": {"acc": float(v)}} for k, v in enumerate(acc[variant][seed])]
            path = tmp_path / f"{variant}-{seed}.jsonl"
            write_items(path, records)
            results.append({"variant": variant, "seed": seed, "items": str(path), "version": "1", "seconds": 1.0,
                            "computed": [], "metrics": {"eval.qa.acc": sum(acc[variant][seed]) / 4}})
    summary = summarise(results, ["single:x", "single:y"], resamples=200)
    inter = summary["interference"]
    # best accuracy = single:x's seed mean 0.625 (not single:y's seed-0 1.0); best bpb = single:x's 1.0
    assert inter["avg_ce"]["units"]["acc"]["value"] == pytest.approx(0.125)
    assert inter["single:y"]["units"]["acc"]["value"] == pytest.approx(0.125)  # a reference meets the same best
    assert inter["avg_ce"]["units"]["bpb"]["value"] == 0.0  # 0.9 beats the best reference's 1.0
    assert inter["single:y"]["units"]["bpb"]["value"] == pytest.approx(0.2)  # 1.2 against 1.0
    assert inter["single:y"]["hurt"] == ["ppl.code.bits_per_byte"]  # every document costs 1.2x: always a drop
    red = summary["reductions"]["adaptive vs avg_ce"]
    assert red["acc"]["value"] == 1.0 and red["bpb"]["value"] is None  # avg_ce loses no bits: nothing to reduce
    assert summary["bootstrap"]["seeds"] == [0, 1]
    assert summarise(results, ["single:x", "single:y"], resamples=200)["interference"] == inter  # reproducible
    md = render_markdown(summary, [{**r, "version": "1"} for r in results], title="t", seconds=1.0, chart=None)
    assert "## Knowledge interference" in md and "| avg_ce | 0 [0, 0] | 0 of 1 | 12.5 [" in md
