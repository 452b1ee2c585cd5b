"""The Prefect flow on tiny models: stages chain, outputs are reused, failures leave nothing complete."""
import json

import pytest
from conftest import write_tiny_pipeline
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import run_pipeline
from fusion_core.data import DataError
from fusion_core.workspace import StageOutput


def _stage_runs(summary: dict) -> dict[str, str]:
    """stage name -> 'reused' / 'computed', read back from MLflow's nested runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    return {r.data.tags["stage"]: ("reused" if r.data.tags.get("reused") == "true" else "computed") for r in children}


def _run_of(summary: dict, stage: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}' and tags.stage = '{stage}'")
    assert len(runs) == 1, stage
    return runs[0]


def test_empty_corpus_fails_before_any_stage(tmp_path, tiny_models, prefect_harness):
    path = write_tiny_pipeline(tmp_path, tiny_models)
    (tmp_path / "corpora" / "code.jsonl").write_text('{"text": "tiny"}\n')
    with pytest.raises(DataError, match="corpus 'code'"):
        run_pipeline(path)
    assert not (tmp_path / "workspace" / "stages").exists()


def test_unknown_evaluation_task_fails_before_any_stage(tmp_path, tiny_models, prefect_harness):
    """A task name neither bundled nor in lm-eval's registry is refused naming the field, before
    any model is built or stage computed."""
    from fusion_core.errors import FusionError

    path = write_tiny_pipeline(tmp_path, tiny_models,
                               **{"evaluation.lm_eval_tasks": ["fusion_arith_mc", "no_such_task_xyz"]})
    with pytest.raises(FusionError, match=r"evaluation.lm_eval_tasks: unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        run_pipeline(path)
    assert not (tmp_path / "workspace" / "stages").exists()


@pytest.mark.slow
def test_pipeline_runs_reuses_and_recovers(tmp_path, tiny_models, prefect_harness, monkeypatch):
    path = write_tiny_pipeline(tmp_path, tiny_models)

    # A training that dies leaves no training output that a later run would take as complete.
    import tasks.fusion_training as ft

    def broken(*args, **kwargs):
        raise RuntimeError("training crashed")

    with monkeypatch.context() as m:
        m.setattr(ft, "train_target", broken)
        with pytest.raises(RuntimeError, match="training crashed"):
            run_pipeline(path)
    stages = tmp_path / "workspace" / "stages"
    assert not (stages / "fusion_training").exists() or not any(
        StageOutput(tmp_path / "workspace", "fusion_training", p.name).complete()
        for p in (stages / "fusion_training").iterdir())

    first = run_pipeline(path)
    assert [n for n, s in first["stages"].items() if s["reused"]] == [
        "prepare_data", "align_vocabularies", "teacher_inference"]
    assert _stage_runs(first) == {"prepare_data": "reused", "align_vocabularies": "reused",
                                  "teacher_inference": "reused", "fusion_training": "computed",
                                  "evaluate": "computed"}
    assert first["version"] == "1" and first["registered_model"] == "tiny-target"
    assert any(k.startswith("eval.fusion_arith_mc.") for k in first["metrics"])
    assert any(k.startswith("ppl.") for k in first["metrics"])

    # The alignment report of every source is in the align_vocabularies run, reused or not, with
    # its coverage metrics; the teacher run has the realised coverage.
    align_run = _run_of(first, "align_vocabularies")
    sources = {m.split(".")[0] for m in align_run.data.metrics if m.endswith(".coverage")}
    assert sources and all(f"{s}.marginal_rate" in align_run.data.metrics for s in sources)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=first["tracking_uri"])
    reports = [a.path for a in client.list_artifacts(align_run.info.run_id, "alignment")]
    assert sorted(reports) == sorted(f"alignment/{s}.alignment.md" for s in sources)
    assert all(f"{s}.coverage" in _run_of(first, "teacher_inference").data.metrics for s in sources)

    second = run_pipeline(path)
    assert all(s["reused"] for s in second["stages"].values())
    assert set(_stage_runs(second).values()) == {"reused"}
    assert second["version"] == "1"  # the same training output is not registered twice

    result = CliRunner().invoke(app, ["compare", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert rows[0]["version"] == "1" and "candidate" in rows[0]["aliases"]
    assert rows[0]["tags"]["strategy"] == "min_ce"
    assert rows[0]["metrics"] and all(k.startswith(("eval.", "ppl.")) for k in rows[0]["metrics"])
    # The second run evaluated nothing again: the target's units came from the first run's records.
    target_runs = [r for r in client.search_runs([_run_of(second, "evaluate").info.experiment_id],
                                                 "tags.model_label = 'target'", order_by=["attributes.start_time"])]
    assert len(target_runs) == 2
    assert not any(k.startswith("evalcache.") for k in target_runs[1].data.tags)
    assert {k for k in target_runs[1].data.tags if k.startswith("evalreused.")} == {
        "evalreused.lm_eval_fusion_arith_mc", "evalreused.perplexity"}
    assert target_runs[1].data.metrics == {**target_runs[0].data.metrics}


@pytest.mark.slow
def test_teacher_stage_resumes_shard_by_shard(tmp_path, tiny_models, prefect_harness, monkeypatch):
    """A teacher stage killed after some shards scores only the rest on the next run."""
    import tasks.teacher_inference as ti

    path = write_tiny_pipeline(tmp_path, tiny_models, **{"teacher.docs_per_shard": 8})
    real = ti.score_shard
    calls: list[str] = []

    def dies_on_the_fifth(*args, **kwargs):
        if len(calls) == 4:
            raise RuntimeError("worker killed")
        calls.append(kwargs["source_name"])
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ti, "score_shard", dies_on_the_fifth)
        with pytest.raises(RuntimeError, match="worker killed"):
            run_pipeline(path)
    work = next((tmp_path / "workspace" / "work" / "teacher_inference").iterdir())
    done = {p.parent.name: len(list(p.parent.glob("shard-*.parquet.json"))) for p in work.glob("*/shard-*.parquet")}
    assert sum(done.values()) == 4

    rescored: list[str] = []

    def counting(*args, **kwargs):
        rescored.append(kwargs["source_name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ti, "score_shard", counting)
    summary = run_pipeline(path)
    out = summary["stages"]["teacher_inference"]["path"]
    from pathlib import Path

    total = len(list(Path(out).glob("*/shard-*.parquet")))
    assert len(rescored) == total - 4  # only the shards the killed run had not finished
    assert not work.exists()  # the work folder is gone once the stage output holds the shards


@pytest.mark.slow
def test_teacher_shards_run_in_worker_processes(tmp_path, tiny_models, prefect_harness, monkeypatch):
    """teacher.task_runner 'processes': shards are scored in worker processes (this process's
    score_shard is never called) and equal, byte for byte, the shards threads score."""
    import hashlib
    from pathlib import Path

    import fusion_core.teacher as teacher

    def shard_digests(summary: dict) -> dict[str, str]:
        out = Path(summary["stages"]["teacher_inference"]["path"])
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.glob("*/shard-*.parquet"))}

    settings = {"teacher.docs_per_shard": 8, "teacher.workers": 2, "teacher.threads": 1}
    path = write_tiny_pipeline(tmp_path, tiny_models, **settings, **{"teacher.task_runner": "processes"})

    def not_here(*args, **kwargs):
        raise AssertionError("a shard was written by the stage's own process")

    # Patched in this process only: a worker process imports fusion_core.teacher afresh.
    with monkeypatch.context() as m:
        m.setattr(teacher, "write_shard", not_here)
        in_processes = run_pipeline(path)
    digests = shard_digests(in_processes)
    train = Path(in_processes["stages"]["prepare_data"]["path"]) / "train.jsonl"
    assert len(digests) == 2 * -(-len(train.read_text().splitlines()) // 8)  # two sources, shards of 8 documents

    path = write_tiny_pipeline(tmp_path, tiny_models, **settings, **{"teacher.task_runner": "threads"})
    in_threads = run_pipeline(path, from_stage="teacher_inference")
    assert in_threads["stages"]["teacher_inference"]["key"] == in_processes["stages"]["teacher_inference"]["key"]
    assert shard_digests(in_threads) == digests


@pytest.mark.slow
def test_adaptive_training_in_two_processes_registers_its_selector(tmp_path, tiny_models, prefect_harness):
    """fusion.training.processes 2: torchrun ranks train the adaptive strategy; the selector's
    usage is logged as metrics and a plot, and the trained selector is in the registered model."""
    from pathlib import Path

    from mlflow import MlflowClient
    from safetensors.torch import load_file

    path = write_tiny_pipeline(tmp_path, tiny_models, **{
        "fusion.strategy": "adaptive", "fusion.training.processes": 2, "fusion.training.threads": 1,
        "fusion.training.micro_batch_size": 2})
    summary = run_pipeline(path)
    training = _run_of(summary, "fusion_training")
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    steps = [m.step for m in client.get_metric_history(training.info.run_id, "loss")]
    # Every step logged by rank 0, forwarded while the ranks ran; then the stage's summary, at the
    # last step (not at step 0, where it would be a false first point of every chart).
    assert steps == [1, 2, 3, 4, 4]
    for source in ("bytes", "words"):
        assert 0.0 <= training.data.metrics[f"select.{source}"] <= 1.0
        assert f"weight.{source}" in training.data.metrics
    assert training.data.metrics["feedback"] >= 0 and "selector_nll" in training.data.metrics
    assert [a.path for a in client.list_artifacts(training.info.run_id, "plots")] == ["plots/selector_usage.png"]
    identity = json.loads(next((tmp_path / "workspace" / "work" / "fusion_training").glob(
        "*/checkpoints/identity.json")).read_text())
    assert identity["world_size"] == 2 and identity["strategy"] == "adaptive"

    version = client.get_model_version(summary["registered_model"], summary["version"])
    assert version.tags["strategy"] == "adaptive" and version.tags["adaptive.objective"] == "likelihood"
    model_id = version.source.removeprefix("models:/")  # the logged model behind the version
    files = [a.path for a in client.list_logged_model_artifacts(model_id, "fusion")]
    assert files == ["fusion/fusion_strategy.safetensors"]
    saved = load_file(Path(summary["stages"]["fusion_training"]["path"]) / "model" / "fusion_strategy.safetensors")
    assert "selector.0.weight" in saved

    table = CliRunner().invoke(app, ["compare", str(path)])
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if "v1" in line)
    assert "candidate" in row and "adaptive:likelihood" in row and " all bpb" in table.output


@pytest.mark.slow
def test_pipeline_trains_missing_references_and_measures_interference(tmp_path, tiny_models, prefect_harness):
    """With evaluation.train_references, one run trains clm and each single-source model, evaluates
    them beside the fused model and logs its interference against them; a second run reuses them."""
    path = write_tiny_pipeline(tmp_path, tiny_models, **{"fusion.strategy": "avg_ce",
                                                        "evaluation.references": ["clm", "single"],
                                                        "evaluation.train_references": True})
    first = run_pipeline(path)
    assert first["metrics"]["interference.references"] == 3
    for unit in ("bpb", "acc"):  # one figure per unit, each with its bootstrap interval
        m = first["metrics"]
        assert m[f"interference.{unit}.lo"] <= m[f"interference.{unit}"] <= m[f"interference.{unit}.hi"]
    assert "interference" not in first["metrics"] and "interference.tasks_hurt" in first["metrics"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=first["tracking_uri"])
    exp = client.get_run(first["run_id"]).info.experiment_id
    trained = client.search_runs([exp], f"tags.mlflow.parentRunId = '{first['run_id']}' and tags.stage = 'fusion_training'")
    assert sorted(r.info.run_name for r in trained) == [
        "fusion_training", "fusion_training [clm]", "fusion_training [single:bytes]", "fusion_training [single:words]"]
    evaluate = _run_of(first, "evaluate")
    assert evaluate.data.tags["missing_references"] == "none"
    report = client.download_artifacts(evaluate.info.run_id, "report/evaluation.md", str(tmp_path))
    text = open(report).read()
    assert "bits per byte: interference =" in text and "accuracy: interference =" in text
    assert "| single:words |" in text and "Missing references" not in text

    second = run_pipeline(path)
    assert all(s["reused"] for s in second["stages"].values())
    again = client.search_runs([exp], f"tags.mlflow.parentRunId = '{second['run_id']}' and tags.stage = 'fusion_training'")
    assert [r.info.run_name for r in again] == ["fusion_training"]  # the references were found, not retrained
    assert second["metrics"]["interference.bpb"] == pytest.approx(first["metrics"]["interference.bpb"])
    assert second["metrics"]["interference.bpb.hi"] == pytest.approx(first["metrics"]["interference.bpb.hi"])


@pytest.mark.slow
def test_changed_weights_or_corpus_at_the_same_path_recompute_every_stage(tmp_path, tiny_models, prefect_harness):
    """A source whose weights change in place (same file, same size, mtime put back) and a corpus
    rewritten at the same path are new inputs: every stage is recomputed, none reused stale. A new
    run of the config also marks KILLED the runs a killed process of it left RUNNING."""
    import shutil
    import socket
    import subprocess
    import sys

    from mlflow import MlflowClient
    from test_filehash import change_a_weight_in_place

    copy = tmp_path / "models" / "byte_level"
    shutil.copytree(tiny_models["byte_level"], copy)
    path = write_tiny_pipeline(tmp_path, {**tiny_models, "byte_level": copy})
    first = run_pipeline(path)
    assert not any(s["reused"] for s in first["stages"].values())

    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    change_a_weight_in_place(weights)
    assert weights.stat().st_size == size
    # A run of this config killed earlier: its parent and stage run left RUNNING by a dead pid.
    client = MlflowClient(tracking_uri=first["tracking_uri"])
    exp = client.get_run(first["run_id"]).info.experiment_id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tags = {k: v for k, v in client.get_run(first["run_id"]).data.tags.items() if not k.startswith("mlflow.")}
    orphan = client.create_run(exp, run_name="tiny-killed",
                               tags={**tags, "host": socket.gethostname(), "pid": str(dead.pid)}).info.run_id
    orphan_stage = client.create_run(exp, run_name="teacher_inference",
                                     tags={"mlflow.parentRunId": orphan, "stage": "teacher_inference"}).info.run_id

    second = run_pipeline(path)
    assert not any(s["reused"] for s in second["stages"].values()), second["stages"]
    assert all(second["stages"][n]["key"] != first["stages"][n]["key"] for n in first["stages"])
    assert _stage_runs(second) == dict.fromkeys(first["stages"], "computed")
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(orphan_stage).info.status == "KILLED"

    corpus = tmp_path / "corpora" / "prose.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: a new text about foxes and dogs, "
                                                  f"rewritten in place {i} times."}) + "\n" for i in range(30)))
    third = run_pipeline(path)
    assert not any(s["reused"] for s in third["stages"].values()), third["stages"]
    assert third["stages"]["prepare_data"]["key"] != second["stages"]["prepare_data"]["key"]
