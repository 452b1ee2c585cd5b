"""Training resumes only from checkpoints no one else could have planted, and never runs code from one.

`check_checkpoint_trust` refuses a checkpoint folder (or `latest`, or a file of the newest tag)
that another user owns or can write (the group only when the workspace's umask shares with it);
`safe_checkpoint_loading` turns DeepSpeed's `torch.load(weights_only=False)` into a weights-only
load. Real DeepSpeed resumes (imitating test_training's) go through both.
"""
import os
import pickle
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from fusion_core.training import CheckpointRefused, check_checkpoint_trust, safe_checkpoint_loading, train_target
from fusion_core.workspace import workspace_umask
from test_training import fusion_cfg, make_examples  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(autouse=True)
def _umask_022():
    with workspace_umask(0o022):  # the default workspace, whatever the shell's umask
        yield


def fake_checkpoints(root):
    ckpt = root / "checkpoints"
    (ckpt / "step2").mkdir(parents=True)
    (ckpt / "latest").write_text("step2")
    (ckpt / "identity.json").write_text("{}")
    (ckpt / "step2" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    return ckpt


class Evil:
    """Unpickling this runs a command (what a planted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_own_checkpoints_are_trusted(tmp_path):
    assert check_checkpoint_trust(fake_checkpoints(tmp_path)) == "step2"


@pytest.mark.parametrize("where,mode,why", [
    ("", 0o777, "writable by every user"),
    ("", 0o775, "writable by its group"),
    ("latest", 0o666, "writable by every user"),
    ("identity.json", 0o664, "writable by its group"),
    ("step2", 0o757, "writable by every user"),
    ("step2/mp_rank_00_model_states.pt", 0o664, "writable by its group"),
])
def test_checkpoints_others_can_write_are_refused(tmp_path, where, mode, why):
    ckpt = fake_checkpoints(tmp_path)
    path = ckpt / where if where else ckpt
    os.chmod(path, mode)
    with pytest.raises(CheckpointRefused) as err:
        check_checkpoint_trust(ckpt)
    msg = str(err.value)
    assert msg.startswith(f"refusing to resume training from {ckpt}: {path} is {why} (mode {mode:04o})")
    assert f"chmod -R go-w {ckpt}" in msg and f"delete {ckpt} to train from the start" in msg


def test_group_write_is_fine_when_the_workspace_shares_with_the_group(tmp_path):
    with workspace_umask(0o002):
        ckpt = fake_checkpoints(tmp_path)
        os.chmod(ckpt, 0o775)
        os.chmod(ckpt / "step2" / "mp_rank_00_model_states.pt", 0o664)
        assert check_checkpoint_trust(ckpt) == "step2"
        os.chmod(ckpt / "latest", 0o666)                    # others: never
        with pytest.raises(CheckpointRefused, match="latest is writable by every user"):
            check_checkpoint_trust(ckpt)


def test_checkpoints_of_another_user_are_refused(tmp_path, monkeypatch):
    ckpt = fake_checkpoints(tmp_path)
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)    # as if another user had written them
    with pytest.raises(CheckpointRefused, match=rf"{ckpt} is owned by user id {me}, not by this user \({me + 1}\)"):
        check_checkpoint_trust(ckpt)


def test_latest_naming_no_step_folder_is_refused(tmp_path):
    ckpt = fake_checkpoints(tmp_path)
    (ckpt / "latest").write_text("../../elsewhere")
    with pytest.raises(CheckpointRefused, match=r"its `latest` file names '\.\./\.\./elsewhere', not a step<N> folder"):
        check_checkpoint_trust(ckpt)


def test_safe_loading_never_runs_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "x": Evil(marker)}, tmp_path / "evil.pt")
    torch.save({"module": {"w": torch.ones(2)}, "rng_state": torch.get_rng_state()}, tmp_path / "good.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")    # not even this lets it through
    with safe_checkpoint_loading():
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            torch.load(tmp_path / "evil.pt", weights_only=False)      # what DeepSpeed asks for
        assert torch.load(tmp_path / "good.pt", weights_only=False)["module"]["w"].sum() == 2
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ            # the environment restored
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_resume_refuses_untrusted_checkpoints_and_resumes_trusted_ones(tiny_models, tiny_corpus, tmp_path,
                                                                        zero_stage):
    src = tiny_models["metaspace"]
    examples = make_examples(src, tiny_corpus[:5], K=2, seed=1)
    cfg = fusion_cfg("min_ce", steps=4, micro_batch_size=2, gradient_accumulation=2, checkpoint_every=2,
                     zero_stage=zero_stage)
    full = train_target(src, examples, fusion=cfg, out_dir=tmp_path / "full", source_names=["a", "b"])

    class Killed(RuntimeError):
        pass

    def kill_at_3(metrics, step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_target(src, examples, fusion=cfg, out_dir=tmp_path / "killed", source_names=["a", "b"], log=kill_at_3)
    ckpt = tmp_path / "killed" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step2"

    # A checkpoint with a planted object is refused before anything in it runs.
    shutil.copytree(tmp_path / "killed", tmp_path / "planted")
    marker = tmp_path / "pwned"
    victim = sorted((tmp_path / "planted" / "checkpoints" / "step2").glob("*model_states.pt"))[0]
    state = torch.load(victim, weights_only=False)  # (the test's own file)
    state["planted"] = Evil(marker)
    torch.save(state, victim)
    with pytest.raises(CheckpointRefused, match=r"checkpoint step2 holds objects other than tensors and "
                                                r"DeepSpeed's training state.*posix\.system"):
        train_target(src, examples, fusion=cfg, out_dir=tmp_path / "planted", source_names=["a", "b"])
    assert not marker.exists()

    # Writable by the group (the workspace's umask keeps the group out): refused, naming the folder.
    os.chmod(ckpt / "step2", 0o775)
    with pytest.raises(CheckpointRefused, match=rf"refusing to resume training from {ckpt}: {ckpt / 'step2'} is "
                                                r"writable by its group"):
        train_target(src, examples, fusion=cfg, out_dir=tmp_path / "killed", source_names=["a", "b"])
    assert not (tmp_path / "killed" / "model").exists()

    # Fixed as the message says: resumes at step 2 and reaches the uninterrupted run's weights.
    subprocess.run(["chmod", "-R", "go-w", str(ckpt)], check=True)
    steps = []
    resumed = train_target(src, examples, fusion=cfg, out_dir=tmp_path / "killed", source_names=["a", "b"],
                           log=lambda m, s: steps.append(s))
    assert resumed.resumed_from_step == 2 and resumed.steps == 4 and steps == [3, 4]
    a = load_file(full.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert resumed.metrics["loss"] == pytest.approx(full.metrics["loss"], abs=1e-6)
