"""What the pipeline writes gets the workspace's permissions: 0644 files and 0755 folders by default
(`workspace.umask: "022"`), whatever the shell's umask and also for files a library made private
(tempfile's 0600/0700); another umask when the workspace says so."""
import os
import stat
import tempfile

import pytest
import yaml

from conftest import write_tiny_pipeline
from flows import pipeline as pipeline_module  # (Prefect sets up logging on import)
from fusion_core.config import ConfigError, load_config
from fusion_core.workspace import StageOutput, current_umask, workspace_umask, write_text_atomic


@pytest.fixture(autouse=True)
def _private_shell():
    """The test runs as from a shell with umask 077; restored after."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def modes(folder):
    return {p.relative_to(folder).as_posix() or ".": stat.S_IMODE(p.stat().st_mode)
            for p in [folder, *folder.rglob("*")]}


def build_output(root):
    out = StageOutput(root, "prepare_data", "k1")
    with out.building() as tmp:
        (tmp / "train.jsonl").write_text("{}\n")
        fd, private = tempfile.mkstemp(dir=tmp, prefix="shard-")        # 0600
        os.write(fd, b"x")
        os.close(fd)
        os.rename(private, tmp / "shard.bin")
        work = tempfile.mkdtemp(dir=tmp)                                 # 0700
        os.rename(work, tmp / "model")
        (tmp / "model" / "weights.safetensors").write_bytes(b"w")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o700)
    assert out.complete()
    return modes(out.path)


@pytest.mark.parametrize("umask,file,folder", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_stage_outputs_get_the_workspace_modes(tmp_path, umask, file, folder):
    with workspace_umask(umask):
        got = build_output(tmp_path)
        write_text_atomic(tmp_path / "configs.yaml", "a: 1\n")
    assert got == {".": folder, "model": folder, "train.jsonl": file, "shard.bin": file, "run.sh": folder,
                   "model/weights.safetensors": file, "manifest.json": file}
    assert stat.S_IMODE((tmp_path / "configs.yaml").stat().st_mode) == file
    assert current_umask() == 0o077                                       # restored


def test_mlflow_artifacts_get_the_workspace_modes(tmp_path):
    from mlflow import MlflowClient

    with workspace_umask(0o022):
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = client.create_experiment("perm", artifact_location=(tmp_path / "artifacts").as_uri())
        run = client.create_run(exp)
        client.log_text(run.info.run_id, "a: 1\n", "config/resolved.yaml")
        client.log_dict(run.info.run_id, {"a": 1}, "prepare_data.json")
    got = modes(tmp_path / "artifacts")
    assert {m for p, m in got.items() if (tmp_path / "artifacts" / p).is_file()} == {0o644}
    assert {m for p, m in got.items() if (tmp_path / "artifacts" / p).is_dir()} == {0o755}


def test_workspace_umask_setting(tmp_path, tiny_models):
    cfg = load_config(write_tiny_pipeline(tmp_path, tiny_models))
    assert cfg.workspace.umask == "022" and cfg.workspace.umask_bits == 0o022
    path = write_tiny_pipeline(tmp_path, tiny_models)
    text = path.read_text().replace("workspace:\n", "workspace:\n  umask: 002\n")   # unquoted: YAML's octal
    path.write_text(text)
    assert yaml.safe_load(text)["workspace"]["umask"] == 2
    assert load_config(path).workspace.umask_bits == 0o002
    for bad in ("000", "020", "775"):
        with pytest.raises(ConfigError, match=r"workspace\.umask.*would let every user write"):
            load_config(write_tiny_pipeline(tmp_path, tiny_models, **{"workspace.umask": bad}))
    with pytest.raises(ConfigError, match=r"workspace\.umask"):
        load_config(write_tiny_pipeline(tmp_path, tiny_models, **{"workspace.umask": "rw-r--r--"}))


def test_the_pipeline_runs_under_the_workspace_umask(tmp_path, tiny_models, monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline_module, "_pipeline", lambda cfg, *a: seen.append(current_umask()) or {})
    for umask, bits in (("022", 0o022), ("002", 0o002)):
        path = write_tiny_pipeline(tmp_path, tiny_models, **{"workspace.umask": umask})
        assert pipeline_module.fusion_pipeline.fn(str(path)) == {}
        assert seen[-1] == bits and current_umask() == 0o077
