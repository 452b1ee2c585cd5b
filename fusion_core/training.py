"""Training the target model on the fusion objective with DeepSpeed (single process or launcher).

`train_target` loads the target (an HF folder), wraps it with the fusion strategy in a
`FusionModel`, and trains it with `deepspeed.initialize` using a client torch AdamW (so no
optimizer op is compiled) and a torch LambdaLR (linear warm-up, cosine down to
`min_lr_ratio`; there is deliberately no DeepSpeed scheduler block, which would override it).

Data order is a pure function of (seed, step): the examples form an endless stream of epochs,
each a permutation drawn from a generator seeded with (seed, epoch); step s on rank r reads
fixed positions of that stream. A resumed run therefore continues exactly where the
checkpoint was taken, without repeating or skipping data, and reaches the same weights as an
uninterrupted run. Checkpoints go to `out_dir/checkpoints/step<N>` (DeepSpeed format, with the
data position, token count and RNG state in client_state); the newest is resumed
automatically when `train_target` starts again with the same out_dir.

Resuming never runs code from a checkpoint: DeepSpeed's loads (which ask torch.load for
weights_only=False) run with weights_only=True, which builds tensors, plain containers and the
few DeepSpeed state classes its checkpoints hold, nothing else (`safe_checkpoint_loading`); and
only from a checkpoint folder that this user owns and that no other user (nor, unless the
workspace's umask lets the group write, the group) can write (`check_checkpoint_trust`).

Outside a launcher, the function sets up a one-process gloo/nccl group on a free port and
tears it down at the end (also on error), so it can be called repeatedly in one process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from fusion_core.errors import FusionError
from fusion_core.workspace import current_umask, write_json_atomic
from fusion_core.fusion import (
    FusionExample, FusionModel, collate, oracle_routing, routing_report, selection_counts, source_count,
    strategy_from_config,
)

log_ = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
IDENTITY_FILE = "identity.json"  # what the checkpoints were written for: data, batching, strategy
MODEL_SUBDIR = "model"
_TAG_RE = re.compile(r"^step(\d+)$")


@dataclass
class TrainingResult:
    model_dir: Path                 # HF folder: trained weights (safetensors) + the target's tokenizer
    steps: int                      # optimizer steps completed (including those before a resume)
    tokens_seen: int                # non-padding tokens trained on, all ranks, all steps
    metrics: dict[str, float]       # the last logged window's metrics
    wall_time_s: float              # this call's wall time
    resumed_from_step: int | None = None
    checkpoint_dir: Path | None = None
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)   # every logged (step, metrics)

    @property
    def seconds(self) -> float:
        return self.wall_time_s


# ---------------------------------------------------------------- schedule and data order

def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Linear warm-up over `warmup_steps` (step 0 gets 1/warmup), then a cosine from 1 down to
    `min_lr_ratio` reached at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DataOrder:
    """The deterministic example stream: epoch e is permutation(seed, e) of range(n)."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("no training examples")
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Example indices at stream positions [start, start + count)."""
        out = []
        for p in range(start, start + count):
            out.append(int(self.perm(p // self.n)[p % self.n]))
        return out


def micro_batch_position(step: int, micro: int, *, rank: int, world_size: int, micro_batch_size: int,
                         gradient_accumulation: int) -> int:
    """Stream position of the first example of micro-batch `micro` of optimizer step `step` on `rank`."""
    m = step * gradient_accumulation + micro
    return (m * world_size + rank) * micro_batch_size


def _data_fingerprint(examples: Sequence[FusionExample]) -> str:
    h = hashlib.sha256()
    h.update(str(len(examples)).encode())
    for ex in examples:
        h.update(ex.input_ids.tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- process group

def _restore_environ(saved: dict[str, str | None]) -> None:
    """Put environment variables back as they were (None: it was not set)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _distributed() -> Iterator[None]:
    """A DeepSpeed process group for the duration of the block.

    Already initialised by the caller: used as is. Under a launcher (WORLD_SIZE set): joined,
    destroyed at the end. Otherwise: a one-process group on a free port, destroyed at the end,
    and the environment restored.
    """
    import deepspeed
    import deepspeed.comm as dist

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    launcher = all(k in os.environ for k in saved)
    if not launcher and os.environ.get("WORLD_SIZE", "1") == "1":
        # One process and no launcher: our own group on a free port.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    try:
        deepspeed.init_distributed(dist_backend=_accelerator().communication_backend_name(), verbose=False)
        yield
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            _restore_environ(saved)


def _prepare_environment() -> None:
    """CPU accelerator when there is no GPU; a persistent cache for DeepSpeed's JIT-built ops."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = os.environ.get("FUSION_TORCH_EXTENSIONS_DIR") or str(
            Path.home() / ".cache" / "torch_extensions")


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


class TrainingDiverged(FusionError, RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step was applied."""


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on a CUDA GPU that supports it, else fp32. An explicit bf16 without such a
    GPU is refused: DeepSpeed's CPU backend would emulate it, 7-20x slower than fp32."""
    if precision == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise ValueError("fusion.training.precision 'bf16' needs a CUDA GPU with bf16 support; this machine has "
                         "none (on the CPU bf16 runs emulated, 7-20x slower than fp32): use 'fp32' or 'auto'")
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(training, *, precision: str) -> dict:
    """The DeepSpeed config dict for a TrainingConfig (no optimizer/scheduler block: both are client objects)."""
    zero: dict = {"stage": int(training.zero_stage)}
    if training.offload_optimizer:
        if training.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    if training.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": int(training.micro_batch_size),
        "gradient_accumulation_steps": int(training.gradient_accumulation),
        "gradient_clipping": float(training.gradient_clipping),
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if training.offload_optimizer and not torch.cuda.is_available():
        # On the CPU accelerator the client torch AdamW already runs on the CPU; avoid compiling cpu_adam.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def _make_optimizer(module: torch.nn.Module, training, selector_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the module's parameters: weight decay on matrices only. With selector_lr, the
    strategy's own parameters (the selection network) form a group of their own at that peak
    learning rate without weight decay (the same schedule scales every group)."""
    own = {id(p) for p in module.strategy.parameters()} if selector_lr is not None and hasattr(module, "strategy") \
        else set()
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in own]
    groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": float(training.weight_decay)},
              {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}]
    if own:
        groups.append({"params": [p for p in module.strategy.parameters() if p.requires_grad],
                       "weight_decay": 0.0, "lr": float(selector_lr)})
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=float(training.learning_rate), betas=tuple(training.betas))
    if training.offload_optimizer and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


# ---------------------------------------------------------------- checkpoints

class CheckpointRefused(FusionError):
    """A checkpoint folder that training does not resume from (untrusted owner, permissions or contents)."""


def _deepspeed_state_classes() -> list:
    """The DeepSpeed classes its checkpoints hold (the ZeRO optimizer's state): what torch.load's
    weights_only unpickler may build besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_WEIGHTS_ONLY_VARIABLES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


@contextlib.contextmanager
def safe_checkpoint_loading() -> Iterator[None]:
    """Every torch.load in the block loads with weights_only=True, also DeepSpeed's, which asks for
    weights_only=False (TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that): tensors, plain containers
    and `_deepspeed_state_classes`, never a function call or an arbitrary class. A file holding
    anything else raises pickle.UnpicklingError before any of it runs."""
    saved = {k: os.environ.get(k) for k in _WEIGHTS_ONLY_VARIABLES}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            yield
    finally:
        _restore_environ(saved)


def check_checkpoint_trust(ckpt_dir: Path) -> str:
    """The tag (step<N>) that `ckpt_dir/latest` names, once the folder, `latest`, identity.json
    and every file of that tag are owned by this user and writable by no other user; writable by
    the group only when this process's umask lets the group write (the workspace says it is
    shared with the group: `workspace.umask: "002"`). Raises CheckpointRefused naming the path."""
    import stat

    ckpt_dir = Path(ckpt_dir)
    uid = os.geteuid()
    group_may_write = not current_umask() & 0o020
    tag = (ckpt_dir / "latest").read_text().strip()
    if not _TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
        raise CheckpointRefused(f"refusing to resume training from {ckpt_dir}: its `latest` file names {tag[:80]!r}, "
                                f"not a step<N> folder in it; delete {ckpt_dir} to train from the start")
    paths = [ckpt_dir, ckpt_dir / "latest", ckpt_dir / IDENTITY_FILE, ckpt_dir / tag,
             *sorted((ckpt_dir / tag).rglob("*"))]
    for p in paths:
        try:
            st = p.stat()  # a symbolic link is judged by what it points to: that is what would be loaded
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != uid:
            why = f"owned by user id {st.st_uid}, not by this user ({uid})"
        elif mode & 0o002:
            why = f"writable by every user (mode {mode:04o})"
        elif mode & 0o020 and not group_may_write:
            why = f"writable by its group (mode {mode:04o}) while the workspace's umask keeps the group from writing"
        else:
            continue
        raise CheckpointRefused(
            f"refusing to resume training from {ckpt_dir}: {p} is {why}. Checkpoints are loaded only from a folder "
            f"this user owns and no one else can write. If this pipeline wrote them: `chmod -R go-w {ckpt_dir}` "
            f"(as their owner); otherwise delete {ckpt_dir} to train from the start")
    return tag


def load_checkpoint_safely(engine, ckpt_dir: Path) -> tuple[str | None, dict | None]:
    """engine.load_checkpoint of the newest checkpoint in `ckpt_dir`, after `check_checkpoint_trust`,
    under `safe_checkpoint_loading`. Raises CheckpointRefused."""
    import pickle

    tag = check_checkpoint_trust(ckpt_dir)
    with safe_checkpoint_loading():
        try:
            return engine.load_checkpoint(str(ckpt_dir), tag=tag)
        except pickle.UnpicklingError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
            raise CheckpointRefused(
                f"refusing to resume training from {ckpt_dir}: checkpoint {tag} holds objects other than tensors "
                f"and DeepSpeed's training state, which are never loaded ({lines[0] if lines else 'not unpickled'}); "
                f"delete {ckpt_dir} to train from the start") from None

def _checkpoint_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    if not ckpt_dir.is_dir():
        return []
    tags = []
    for p in ckpt_dir.iterdir():
        m = _TAG_RE.match(p.name)
        if m and p.is_dir():
            tags.append((int(m.group(1)), p.name))
    return sorted(tags)


def _prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    tags = _checkpoint_tags(ckpt_dir)
    for _, tag in tags[:-keep] if keep > 0 else []:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _save_final_model(engine, model: FusionModel, tokenizer_src: Path, out: Path, *, zero_stage: int,
                      rank: int) -> None:
    if zero_stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()   # every rank must call it; rank 0 gets the dict
    else:
        full = None
    if rank != 0:
        return
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student = model.student
    if full is not None:
        sd = {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}
        student.save_pretrained(str(tmp), state_dict=sd)
        strat = {k[len("strategy."):]: v for k, v in full.items() if k.startswith("strategy.")}
    else:
        student.save_pretrained(str(tmp))
        strat = {k: v.detach().cpu() for k, v in model.strategy.state_dict().items()}
    if strat:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in strat.items()}, str(tmp / "fusion_strategy.safetensors"))
    AutoTokenizer.from_pretrained(str(tokenizer_src)).save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ---------------------------------------------------------------- training

def train_target(model_dir: Path, examples: Sequence[FusionExample], *, fusion, out_dir: Path,
                 source_names: list[str], log: Callable[[dict[str, float], int], None] | None = None,
                 keep_checkpoints: int = 2) -> TrainingResult:
    """Train the target in `model_dir` on `examples` with the fusion objective of `fusion` (FusionConfig).

    Writes checkpoints under out_dir/checkpoints (resumed automatically) and the trained model
    to out_dir/model. `log(metrics, step)` is called on rank 0 every `log_every` steps and after
    the last step, with loss, clm, kd, the strategy's own terms (feedback, selector_nll), lr,
    tokens_per_s, step_time_s, tokens_seen, epoch, select.<source> (share of sequences that
    select the source: weight above zero) and weight.<source> (its mean weight).
    An exception raised by `log` aborts training (checkpoints already written stay valid).
    Raises ValueError for inconsistent inputs or a checkpoint from different data/batching.
    """
    t_start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    training = fusion.training
    examples = list(examples)
    if not examples:
        raise ValueError("no training examples")
    K = source_count(examples)
    strategy = strategy_from_config(fusion, source_names)
    if strategy.uses_teachers and K != len(source_names):
        raise ValueError(f"examples carry {K} sources but {len(source_names)} source names were given")
    precision = resolve_precision(training.precision)

    _prepare_environment()
    import deepspeed
    import deepspeed.comm as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    old_threads = torch.get_num_threads()
    if training.threads:
        torch.set_num_threads(int(training.threads))
    engine = None
    try:
        with _distributed():
            rank, world = dist.get_rank(), dist.get_world_size()
            torch.manual_seed(training.seed)
            student = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
            student.config.use_cache = False
            if training.reinit_target:
                reinitialize(student, int(training.seed))
            strategy.prepare(examples)
            tok = AutoTokenizer.from_pretrained(str(model_dir))
            pad_id = next((int(x) for x in (tok.pad_token_id, student.config.pad_token_id, tok.eos_token_id)
                           if x is not None), 0)
            model = FusionModel(student, strategy, clm_weight=fusion.clm_weight)
            model.train()
            selector_lr = fusion.adaptive.learning_rate if fusion.strategy == "adaptive" else None
            optimizer = _make_optimizer(model, training, selector_lr)
            total = int(training.steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
                s, total_steps=total, warmup_steps=training.warmup_steps, min_lr_ratio=training.min_lr_ratio))
            ds_config = deepspeed_config(training, precision=precision)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
            device = engine.device

            ckpt_dir = out_dir / CHECKPOINT_SUBDIR
            identity = {
                "num_examples": len(examples), "data_fingerprint": _data_fingerprint(examples),
                "micro_batch_size": int(training.micro_batch_size),
                "gradient_accumulation": int(training.gradient_accumulation),
                "world_size": int(world), "seed": int(training.seed), "num_sources": int(K),
                "reinit_target": bool(training.reinit_target),
                "strategy": strategy.name,
                "strategy_parameters": {k: list(v.shape) for k, v in strategy.state_dict().items()},
            }
            step, tokens_seen, resumed_from = 0, 0, None
            if (ckpt_dir / "latest").is_file():
                # Checked before loading: a checkpoint of another strategy would not even load.
                saved_identity = (json.loads((ckpt_dir / IDENTITY_FILE).read_text())
                                  if (ckpt_dir / IDENTITY_FILE).is_file() else {})
                diff = {k: (saved_identity.get(k), v) for k, v in identity.items() if saved_identity.get(k) != v}
                if diff:
                    raise ValueError(f"checkpoint in {ckpt_dir} was written for other data, batching or strategy "
                                     f"(saved, now): {diff}; use a new out_dir or delete the checkpoints")
                path, client = load_checkpoint_safely(engine, ckpt_dir)
                if path is None:
                    raise RuntimeError(f"could not load the latest checkpoint in {ckpt_dir}")
                step = resumed_from = int(client["step"])
                tokens_seen = int(client["tokens_seen"])
                if client.get("rng_state") is not None:
                    torch.set_rng_state(client["rng_state"])
                log_.info("resumed from %s at step %d", path, step)

            order = DataOrder(len(examples), training.seed)
            mbs, gas = int(training.micro_batch_size), int(training.gradient_accumulation)
            history: list[tuple[int, dict[str, float]]] = []
            metrics: dict[str, float] = {}
            win = _Window(len(source_names) if strategy.uses_teachers else 0)
            last_saved = resumed_from

            def save(at: int) -> None:
                client = {"step": at, "tokens_seen": tokens_seen, "identity": identity,
                          "stream_position": micro_batch_position(at, 0, rank=0, world_size=world,
                                                                  micro_batch_size=mbs, gradient_accumulation=gas),
                          "epoch": micro_batch_position(at, 0, rank=0, world_size=world, micro_batch_size=mbs,
                                                        gradient_accumulation=gas) // len(examples),
                          "rng_state": torch.get_rng_state()}
                if rank == 0 and not (ckpt_dir / IDENTITY_FILE).is_file():
                    ckpt_dir.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(ckpt_dir / IDENTITY_FILE, identity)
                engine.save_checkpoint(str(ckpt_dir), tag=f"step{at}", client_state=client)
                if rank == 0:
                    _prune_checkpoints(ckpt_dir, keep_checkpoints)

            while step < total:
                t0 = time.perf_counter()
                lr = float(engine.get_lr()[0])
                for micro in range(gas):
                    pos = micro_batch_position(step, micro, rank=rank, world_size=world, micro_batch_size=mbs,
                                               gradient_accumulation=gas)
                    picked = [examples[i] for i in order.indices(pos, mbs)]
                    batch = collate(picked, pad_id)
                    n_tok = int(batch.pop("lengths").sum())
                    batch = {k: v.to(device) for k, v in batch.items()}
                    out = engine(**batch)
                    finite = torch.isfinite(out["loss"].detach()).to(torch.float64).reshape(1)
                    if world > 1:
                        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                    if not bool(finite.item()):
                        kept = (f"the last good checkpoint, step {last_saved}, is kept in {ckpt_dir}"
                                if last_saved else "no checkpoint had been written yet")
                        parts = ", ".join(f"{k} {float(v):.4g}" for k, v in out.items()
                                          if k != "weights" and v.ndim == 0)
                        raise TrainingDiverged(f"step {step + 1} (micro-batch {micro + 1}): the loss is not finite "
                                               f"({parts}); training stopped before applying it; {kept}")
                    engine.backward(out["loss"])
                    engine.step()
                    win.add(out, n_tok, [ex.domain for ex in picked], batch["nll_per_byte"])
                step += 1
                win.steps += 1
                win.seconds += time.perf_counter() - t0
                win.lr = lr
                # tokens of all ranks (cheap: one scalar all-reduce per step)
                tok_t = torch.tensor([float(win.pending_tokens)], dtype=torch.float64, device=device)
                if world > 1:
                    dist.all_reduce(tok_t)
                tokens_seen += int(tok_t.item())
                win.tokens += int(tok_t.item())
                win.pending_tokens = 0
                if step % training.checkpoint_every == 0 or step == total:
                    save(step)
                    last_saved = step
                if step % training.log_every == 0 or step == total:
                    metrics = win.metrics(source_names, world, dist, device)
                    metrics.update(tokens_seen=float(tokens_seen),
                                   epoch=float(micro_batch_position(step, 0, rank=0, world_size=world,
                                                                    micro_batch_size=mbs, gradient_accumulation=gas)
                                               / len(examples)))
                    win = _Window(win.K)
                    if step == total:   # how the trained strategy routes every training document
                        metrics.update(_final_routing(engine, model, examples, source_names, pad_id,
                                                      int(training.zero_stage)))
                    if rank == 0:
                        history.append((step, dict(metrics)))
                        if log is not None:
                            log(dict(metrics), step)
            if last_saved != step:   # resumed at the end: nothing new to save
                save(step)

            model_out = out_dir / MODEL_SUBDIR
            _save_final_model(engine, model, model_dir, model_out, zero_stage=int(training.zero_stage), rank=rank)
            dist.barrier()
            return TrainingResult(model_dir=model_out, steps=step, tokens_seen=tokens_seen, metrics=metrics,
                                  wall_time_s=time.perf_counter() - t_start, resumed_from_step=resumed_from,
                                  checkpoint_dir=ckpt_dir, history=history)
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.destroy()
        del engine
        torch.set_num_threads(old_threads)


def reinitialize(model: torch.nn.Module, seed: int) -> None:
    """Draw fresh weights for a decoder from `seed` with the usual transformer rule (the same
    seed gives the same weights): linear and embedding weights ~ N(0, initializer_range), biases
    0, norm weights 1. Tied weights stay tied. Written out rather than through transformers'
    `_init_weights`, which skips parameters that were loaded from a checkpoint."""
    std = float(getattr(getattr(model, "config", None), "initializer_range", None) or 0.02)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()
            elif "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor):
                weight.fill_(1.0)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _final_routing(engine, model: FusionModel, examples, source_names, pad_id: int, zero_stage: int) -> dict:
    """The trained strategy's routing over every training document (`fusion.routing_report`)."""
    strategy = model.strategy
    if not strategy.uses_teachers:
        return {}
    params = list(strategy.parameters())
    ctx = contextlib.nullcontext()
    if zero_stage == 3 and params:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with ctx:
        return routing_report(strategy, examples, source_names, pad_id=pad_id)


class _Window:
    """Running sums for one logging window."""

    def __init__(self, K: int):
        self.K = K
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.steps = 0
        self.seconds = 0.0
        self.tokens = 0
        self.pending_tokens = 0
        self.lr = float("nan")
        self.select = np.zeros(K, dtype=np.float64)
        self.weight = np.zeros(K, dtype=np.float64)
        self.sequences = 0
        # per domain: [sequences, routed to the oracle, K mean weights]
        self.by_domain: dict[str, np.ndarray] = {}

    def add(self, out: dict[str, torch.Tensor], n_tok: int, domains: Sequence[str] = (),
            nll_per_byte: torch.Tensor | None = None) -> None:
        for k, v in out.items():
            if k != "weights" and v.ndim == 0:
                self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.micro += 1
        self.pending_tokens += n_tok
        w = out["weights"]
        self.sequences += int(w.shape[0])
        if self.K and w.shape[1] == self.K:
            chosen, weight = selection_counts(w)
            self.select += chosen.cpu().numpy()
            self.weight += weight.cpu().numpy()
            if domains and nll_per_byte is not None:
                wn = w.detach().float().cpu().numpy()
                hit = (w.detach().argmax(1).cpu() == oracle_routing(nll_per_byte.cpu())).numpy()
                for i, d in enumerate(domains):
                    row = self.by_domain.setdefault(d, np.zeros(2 + self.K))
                    row[0] += 1
                    row[1] += hit[i]
                    row[2:] += wn[i]

    def metrics(self, source_names: Sequence[str], world: int, dist, device) -> dict[str, float]:
        keys = sorted(self.sums)
        vals = torch.tensor([self.sums[k] for k in keys] + [float(self.micro)] + list(self.select)
                            + list(self.weight) + [float(self.sequences)], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(vals)
        vals = vals.cpu().numpy()
        n_micro = max(vals[len(keys)], 1.0)
        m = {k: float(vals[i] / n_micro) for i, k in enumerate(keys)}
        seqs = max(vals[-1], 1.0)
        for i, name in enumerate(source_names[: self.K]):
            m[f"select.{name}"] = float(vals[len(keys) + 1 + i] / seqs)
            m[f"weight.{name}"] = float(vals[len(keys) + 1 + self.K + i] / seqs)
        # per-domain usage of this rank's window (domains differ between ranks' windows: not reduced)
        for d, row in sorted(self.by_domain.items()):
            m[f"routing_window.accuracy.{d}"] = float(row[1] / max(row[0], 1))
            for i, name in enumerate(source_names[: self.K]):
                m[f"weight.{name}.{d}"] = float(row[2 + i] / max(row[0], 1))
        m["lr"] = self.lr
        m["step_time_s"] = self.seconds / max(self.steps, 1)
        m["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return m
