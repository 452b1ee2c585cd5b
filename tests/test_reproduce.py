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
    # Every fused variant's interference is measured against all three references of its seed.
    table = out["summary"]["table"]
    for v in ("min_ce", "avg_ce", "adaptive"):
        assert table[v]["interference.references"]["mean"] == 3
        assert table[v]["interference"]["mean"] >= 0
    assert set(out["summary"]["reductions"]) == {"adaptive vs avg_ce", "adaptive vs min_ce"}
    report = open(out["report"]).read()
    assert "| interference ↓ |" in report and "## Interference reduction of adaptive" in report

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'workspace' / 'mlflow' / 'mlflow.db'}")
    parent = client.get_run(out["run_id"])
    assert parent.data.tags["reproduce"] == "true" and "adaptive.interference" in parent.data.metrics
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
    assert len(compared["rows"]) == len(VARIANTS) and "interference" not in compared["metrics"]  # not shared by refs
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
