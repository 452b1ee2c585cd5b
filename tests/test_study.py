"""`fusion study`: the protocol's pieces on hand-made results, then the whole study on the tiny pipeline."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_tiny_pipeline
from flows.cli import app
from flows.study import Journal, PlannedRun, analyse, parse_tuning, selection_score
from fusion_core.errors import FusionError


def test_tuning_grid_and_selection_score():
    assert parse_tuning("fusion.training.learning_rate=1e-3, 3e-3") == [
        ["fusion.training.learning_rate=1e-3"], ["fusion.training.learning_rate=3e-3"]]
    assert parse_tuning("none") == [[]] and parse_tuning(None) == [[]]
    with pytest.raises(FusionError, match="dotted.key=value1,value2"):
        parse_tuning("fusion.training.learning_rate")
    m = {"ppl.prose.bits_per_byte": 2.0, "ppl.code.bits_per_byte": 1.0, "ppl.mixed.bits_per_byte": 9.0,
         "ppl.all.bits_per_byte": 5.0}
    # each training domain counts once; the held-out one takes no part in any choice
    assert selection_score(m, ["code", "prose"]) == 1.5
    assert math.isnan(selection_score(m, ["code", "arithmetic"]))


def test_journal_takes_back_only_finished_runs(tmp_path):
    run = PlannedRun("final", "adaptive:kd", 3, 0, [], tmp_path / "c.yaml", "abcd")
    j = Journal(tmp_path / "runs")
    assert j.get(run) is None
    evaluate = tmp_path / "eval"
    j.put(run, {"evaluate_path": str(evaluate), "metrics": {}})
    assert j.get(run) is None                      # its evaluation is gone: not a finished result
    evaluate.mkdir()
    (evaluate / "manifest.json").write_text("{}")
    assert j.get(run)["evaluate_path"] == str(evaluate)


def _write_items(folder, bits_per_doc, domain, acc=None):
    folder.mkdir(parents=True)
    lines = [{"unit": "perplexity", "kind": "document", "id": f"{domain}-{i}", "domain": domain, "bits": b,
              "bytes": 100, "tokens": 40} for i, b in enumerate(bits_per_doc)]
    if acc is not None:
        lines += [{"unit": "lm_eval:t", "kind": "question", "task": "eval.t", "id": str(i), "scores": {"acc": a}}
                  for i, a in enumerate(acc)]
    (folder / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "manifest.json").write_text("{}")


def test_analysis_pairs_seeds_and_documents_and_reads_routing(tmp_path):
    """adaptive is better than min_ce on every code document of every seed by 10 bits (0.1 bits per
    byte): the paired difference is exactly -0.1 and significant, although the documents differ
    between each other by far more than that."""
    rng = np.random.default_rng(0)
    base = rng.uniform(50, 150, size=30)
    final = []
    for seed in (0, 1, 2):
        for variant, shift in (("clm", 20.0), ("single:a", 5.0), ("min_ce", 10.0), ("adaptive", 0.0)):
            folder = tmp_path / f"{variant}-{seed}"
            _write_items(folder, base + shift + seed, "code", acc=[1, 0, 1, 1] if variant != "clm" else [0, 0, 1, 0])
            routing = {"routing.accuracy.code": 0.9 + 0.01 * seed} if variant in ("min_ce", "adaptive") else {}
            final.append({"variant": variant, "seed": seed, "evaluate_path": str(folder), "training": routing})
    tuning = [{"variant": v, "setting": i, "grid": [f"k={i}"], "score": s}
              for v, scores in (("clm", (2.0, 1.9)), ("single:a", (1.8, 1.85)), ("min_ce", (1.7, 1.6)),
                                ("adaptive", (1.5, 1.65))) for i, s in enumerate(scores)]
    a = analyse(final, tuning, ["clm", "single:a", "min_ce", "adaptive"], ["code"], [], resamples=300)
    assert a["seeds"] == [0, 1, 2] and a["references"] == ["clm", "single:a"]
    d = a["paired"]["adaptive"]["min_ce"]["ppl.code.bits_per_byte"]
    assert d["value"] == pytest.approx(-0.1) and d["lo"] == pytest.approx(-0.1) and d["significant"]
    assert a["paired"]["adaptive"]["min_ce"]["eval.t.acc"]["value"] == 0.0
    assert not a["paired"]["adaptive"]["min_ce"]["eval.t.acc"]["significant"]
    s = a["scores"]["adaptive"]["ppl.code.bits_per_byte"]
    assert s["value"] == pytest.approx(base.mean() / 100 + 0.01) and s["lo"] < s["value"] < s["hi"]
    # interference against the one reference set: adaptive beats both references on code
    assert a["interference"]["adaptive"]["units"]["bpb"]["value"] == 0.0
    assert a["interference"]["min_ce"]["units"]["bpb"]["value"] > 0
    assert a["routing"]["adaptive"]["routing.accuracy.code"]["mean"] == pytest.approx(0.91)
    assert a["chosen"]["adaptive"]["setting"] == 0 and a["chosen"]["min_ce"]["setting"] == 1
    assert a["validation_winner"] == "adaptive"


@pytest.mark.slow
def test_study_on_the_tiny_pipeline_tunes_reports_and_resumes(tmp_path, tiny_models, prefect_harness):
    from mlflow import MlflowClient

    path = write_tiny_pipeline(tmp_path, tiny_models, **{"data.test_fraction": 0.25})
    variants = ["clm", "single:bytes", "min_ce", "adaptive"]
    args = ["study", str(path), "--json", "--seed", "0", "--seed", "1", "--resamples", "200",
            "--tune", "fusion.training.learning_rate=1e-3,2e-3"] + [x for v in variants for x in ("--variant", v)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    a = out["analysis"]
    assert a["variants"] == variants and a["seeds"] == [0, 1]
    # every variant was tuned on the same two settings, on validation
    assert {v: sorted(r["setting"] for r in rows) for v, rows in a["tuning"].items()} == {v: [0, 1] for v in variants}
    records = json.loads(open(out["json"]).read())["records"]
    assert len(records) == 4 * 2 + 4 * 2
    assert all("evaluation.split=validation" in r["overrides"] for r in records if r["phase"] == "tune")
    assert all("evaluation.split=test" in r["overrides"] and "fusion.training.reinit_target=true" in r["overrides"]
               for r in records if r["phase"] == "final")
    assert set(a["paired"]["adaptive"]) == {"clm", "single:bytes", "min_ce"}
    d = a["paired"]["adaptive"]["min_ce"]["ppl.code.bits_per_byte"]
    assert d["lo"] <= d["value"] <= d["hi"]
    assert a["routing"]["min_ce"]["routing.accuracy.all"]["mean"] == 1.0
    assert 0 <= a["routing"]["adaptive"]["routing.accuracy.all"]["mean"] <= 1
    report = open(out["report"]).read()
    for section in ("## Tuning on validation", "## Test scores", "## Knowledge interference",
                    "## Paired differences", "## Routing"):
        assert section in report
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'workspace' / 'mlflow' / 'mlflow.db'}")
    parent = client.get_run(out["run_id"])
    assert parent.data.tags["study"] == "true"
    assert sorted(x.path for x in client.list_artifacts(out["run_id"], "report")) == [
        "report/study.json", "report/study.md", "report/study.png"]
    for r in records:
        assert client.get_run(r["run_id"]).data.tags["mlflow.parentRunId"] == out["run_id"]
    # Run again: every pipeline comes back from the journal, nothing is trained or evaluated again.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    rerun = json.loads(open(json.loads(again.stdout)["json"]).read())["records"]
    assert all(r["computed"] == [] for r in rerun)
    assert json.loads(again.stdout)["analysis"]["scores"] == a["scores"]


def test_a_journaled_run_is_keyed_by_the_contents_of_its_models_and_corpora(tmp_path, tiny_models):
    from flows.study import plan_run

    path = write_tiny_pipeline(tmp_path, tiny_models, **{"data.test_fraction": 0.25})
    grid = parse_tuning("none")
    same = plan_run(path, [], "final", "min_ce", 0, 0, grid, "inputs-a")
    assert plan_run(path, [], "final", "min_ce", 0, 0, grid, "inputs-a").fingerprint == same.fingerprint
    assert plan_run(path, [], "final", "min_ce", 0, 0, grid, "inputs-b").fingerprint != same.fingerprint
    assert plan_run(path, [], "final", "min_ce", 1, 0, grid, "inputs-a").fingerprint != same.fingerprint
