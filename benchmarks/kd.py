"""Benchmark of the sparse KD loss against the dense FuseLLM-style loss (prints figures; not a test).

    .venv/bin/python benchmarks/kd.py [--sources 3] [--vocab 49152] [--batch 4] [--length 512] [--top-k 10]
        [--temperature 1.0] [--dense-layout sum|stacked] [--repeats 3] [--device auto] [--dtype float32]
        [--threads 2] [--seed 0]

Both variants get the SAME random batch (seeded, built on the CPU, then cast to --dtype and moved
to the device): student logits z [B, L, V] ~ N(0, 1), which require grad; labels uniform over V
with the last position of each row -100; teacher_ids [B, K, L, k] uniform over V, with
duplicates: each entry of sources 1..K-1 repeats source 0's entry at the same (position, rank)
with probability 1/4, and each entry after the first repeats its predecessor with probability
1/20 (a projection collision); teacher_logprobs = log_softmax over the k entries of 2 * N(0, 1);
per (sequence, source, position), 10% unaligned (ids[..., 0] = label, logprobs[..., 0] = 0, the
rest -inf: the stored one-hot of the label) and 2% without any valid entry (all -inf, ids 0, as
`fusion.collate` pads); weights [B, K] = softmax of N(0, 1).

- "sparse": `fusion.sparse_kd_loss(z, teacher_ids, teacher_logprobs, weights, labels, T)`.
- "dense": the FuseLLM / public-reference way. Each source's distribution is materialised as a
  dense [B, L, V] tensor (zeros, scatter-added top-k softmax(logprobs / T), plus the one-hot of the
  label where a position has no valid entry); the per-sequence weights are broadcast and the fused
  P [B, L, V] is their weighted sum: --dense-layout sum (default) accumulates the K weighted
  tensors one by one, --dense-layout stacked stacks them into [B, L, V, K] first and reduces
  over K after weighting, as the reference code does. Then the mean over labelled positions of
  -sum_v P log_softmax(z).
Both compute in at least float32 (bfloat16 / float16 logits are cast, as `sparse_kd_loss` does).

Prints a line naming the device (GPU name, or CPU cores) and torch threads, then the batch, then:

1. Agreement, in this process, one forward + backward of each on the same inputs: both loss
   values, their absolute and relative difference, and the largest absolute difference of their
   gradients w.r.t. z (also relative to the largest gradient). The command stops with exit status
   1 if the losses differ by more than 1e-4 relative, or the gradients by more than
   max(1e-4, 2 eps(dtype)) of the largest gradient.
2. Per variant, each in its own fresh process (multiprocessing spawn) holding the batch: one
   warm-up step (excluded), one step measured for memory, then --repeats timed steps, the two
   variants' steps alternating (sparse, dense, sparse, dense...). A step is the loss forward plus
   backward w.r.t. z (z.grad reset to None before it). Table: loss value, step time (ms, best of
   --repeats; every run is listed below it), and the loss's memory above the baseline of the
   process holding z and the batch: "forward" the peak during the forward; "backward" the peak
   during the backward less the gradient of z itself (B*L*V elements of --dtype, which the
   backward leaves behind); "peak" the larger of the two. z and its gradient are the same for
   both variants and are not counted. On CPU: the resident set size of the worker process, its
   high-water mark (VmHWM) reset through /proc/self/clear_refs before each phase and the
   baseline read from /proc/self/statm (Linux only); on CUDA: torch.cuda.max_memory_allocated
   (peak stats reset before each phase) against torch.cuda.memory_allocated before. A row
   dense/sparse gives the ratios of step time and peak memory.
3. The issue's targets: at least 10x less peak loss memory and at least 2x faster steps for the
   sparse loss (the dense/sparse ratios), each "met" or "NOT met" with its ratio. Ratios are
   printed truncated to two decimals, never rounded up.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from fusion_core.fusion import IGNORE_INDEX, sparse_kd_loss
from fusion_core.models import resolve_device, resolve_dtype

VARIANTS = ("sparse", "dense")
MEMORY_TARGET, TIME_TARGET = 10.0, 2.0
MIB = 2**20


def make_batch(opts: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The seeded random batch (module doc) on opts.device; logits in opts.dtype, not yet requiring grad."""
    B, L, V, K, k = opts.batch, opts.length, opts.vocab, opts.sources, opts.top_k
    g = torch.Generator().manual_seed(opts.seed)
    logits = torch.randn(B, L, V, generator=g).to(opts.dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, -1] = IGNORE_INDEX
    ids = torch.randint(0, V, (B, K, L, k), generator=g)
    shared = torch.rand(B, K, L, k, generator=g) < 0.25
    shared[:, 0] = False
    ids = torch.where(shared, ids[:, :1].expand_as(ids), ids)
    repeat = torch.rand(B, K, L, k - 1, generator=g) < 0.05
    ids[..., 1:] = torch.where(repeat, ids[..., :-1], ids[..., 1:])
    logprobs = torch.log_softmax(2 * torch.randn(B, K, L, k, generator=g), dim=-1)
    state = torch.rand(B, K, L, generator=g)
    unaligned, empty = state < 0.10, (state >= 0.10) & (state < 0.12)
    ids[..., 0] = torch.where(unaligned, labels.clamp_min(0)[:, None, :], ids[..., 0])
    one_hot = torch.full((k,), -math.inf)
    one_hot[0] = 0.0
    logprobs = torch.where(unaligned[..., None], one_hot, logprobs).masked_fill(empty[..., None], -math.inf)
    ids = ids.masked_fill(empty[..., None], 0)
    weights = torch.softmax(torch.randn(B, K, generator=g), dim=-1)
    batch = dict(logits=logits, teacher_ids=ids, teacher_logprobs=logprobs, weights=weights, labels=labels)
    return {name: t.to(opts.device) for name, t in batch.items()}


def dense_kd_loss(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                  weights: torch.Tensor, labels: torch.Tensor, temperature: float, layout: str) -> torch.Tensor:
    """The dense reference (module doc): P [B, L, V] materialised, then -sum_v P log_softmax(z)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    B, L, V = z.shape
    K = teacher_ids.shape[1]
    valid = torch.isfinite(teacher_logprobs)
    has = valid.any(dim=-1, keepdim=True)
    scaled = teacher_logprobs.to(z.dtype).masked_fill(~valid, -math.inf) / temperature
    q = torch.softmax(scaled.masked_fill(~has, 0.0), dim=-1) * valid                 # [B,K,L,k]
    ids = teacher_ids.masked_fill(~valid, 0)
    no_signal = (~has).to(z.dtype)                                                     # [B,K,L,1]
    label_ids = labels.clamp_min(0).unsqueeze(-1)                                      # [B,L,1]

    def source(i: int) -> torch.Tensor:
        dense = z.new_zeros(B, L, V)
        dense.scatter_add_(-1, ids[:, i], q[:, i])
        return dense.scatter_add_(-1, label_ids, no_signal[:, i])

    w = weights.to(z.dtype)
    if layout == "stacked":
        p = (torch.stack([source(i) for i in range(K)], dim=-1) * w[:, None, None, :]).sum(-1)
    else:
        p = z.new_zeros(B, L, V)
        for i in range(K):
            p.add_(source(i).mul_(w[:, i, None, None]))
    per_pos = -(p * torch.log_softmax(z, dim=-1)).sum(-1)                              # [B,L]
    mask = labels != IGNORE_INDEX
    return torch.where(mask, per_pos, torch.zeros_like(per_pos)).sum() / mask.sum().clamp_min(1)


def kd_loss(variant: str, batch: dict[str, torch.Tensor], opts: argparse.Namespace) -> torch.Tensor:
    args = (batch["logits"], batch["teacher_ids"], batch["teacher_logprobs"], batch["weights"], batch["labels"],
            opts.temperature)
    return sparse_kd_loss(*args) if variant == "sparse" else dense_kd_loss(*args, opts.dense_layout)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class CpuMemory:
    """This process's resident set size (Linux /proc): now, and its high-water mark since reset()."""

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class CudaMemory:
    """Bytes held by PyTorch's CUDA allocator: now, and the most since reset()."""

    def __init__(self, device: str):
        self.device = device

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


_WORKER: dict = {}


def _init_worker(variant: str, opts: argparse.Namespace) -> None:
    torch.set_num_threads(opts.threads)
    batch = make_batch(opts)
    batch["logits"].requires_grad_()
    memory = CudaMemory(opts.device) if opts.device.startswith("cuda") else CpuMemory()
    _WORKER.update(variant=variant, opts=opts, batch=batch, memory=memory)


def _step() -> float:
    """One timed forward + backward in the worker; seconds."""
    variant, opts, batch = _WORKER["variant"], _WORKER["opts"], _WORKER["batch"]
    batch["logits"].grad = None
    sync(opts.device)
    t0 = time.perf_counter()
    kd_loss(variant, batch, opts).backward()
    sync(opts.device)
    return time.perf_counter() - t0


def _memory_step() -> tuple[float, float, float]:
    """One forward + backward in the worker: (loss, forward peak, backward peak less z's gradient), bytes."""
    variant, opts, batch, memory = _WORKER["variant"], _WORKER["opts"], _WORKER["batch"], _WORKER["memory"]
    logits = batch["logits"]
    logits.grad = None
    sync(opts.device)
    base = memory.current()
    memory.reset()
    loss = kd_loss(variant, batch, opts)
    sync(opts.device)
    forward = memory.peak() - base
    memory.reset()
    loss.backward()
    sync(opts.device)
    backward = memory.peak() - base - logits.numel() * logits.element_size()
    return loss.item(), forward, backward


def check_agreement(opts: argparse.Namespace) -> bool:
    """Print the agreement of the two variants' losses and gradients (module doc, 1.); True if they agree."""
    batch = make_batch(opts)
    logits = batch["logits"].requires_grad_()
    values, grads = {}, {}
    for variant in VARIANTS:
        loss = kd_loss(variant, batch, opts)
        (grads[variant],) = torch.autograd.grad(loss, logits)
        values[variant] = loss.item()
    s, d = values["sparse"], values["dense"]
    diff = abs(s - d)
    rel = diff / max(abs(s), abs(d), 1e-30)
    grad_diff = (grads["sparse"].float() - grads["dense"].float()).abs().max().item()
    grad_max = grads["dense"].float().abs().max().item()
    grad_rel = grad_diff / max(grad_max, 1e-30)
    grad_tol = max(1e-4, 2 * torch.finfo(opts.dtype).eps)
    loss_ok, grad_ok = rel <= 1e-4, grad_rel <= grad_tol
    print(f"\n== 1. agreement (this process, one forward + backward each, dense layout {opts.dense_layout})")
    print(f"loss: sparse {s:.8f}, dense {d:.8f}; |difference| {diff:.3e} (relative {rel:.3e}, tolerance 1e-4): "
          + ("agree" if loss_ok else "DIFFER"))
    print(f"gradient w.r.t. z: max |sparse - dense| {grad_diff:.3e}, max |gradient| {grad_max:.3e} (relative "
          f"{grad_rel:.3e}, tolerance {grad_tol:.1e}): " + ("agree" if grad_ok else "DIFFER"))
    return loss_ok and grad_ok


def truncated(x: float) -> str:
    return "inf" if math.isinf(x) else f"{math.floor(x * 100) / 100:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=3, help="K, teacher sources")
    ap.add_argument("--vocab", type=int, default=49152, help="V, the student vocabulary (SmolLM2's by default)")
    ap.add_argument("--batch", type=int, default=4, help="B, sequences")
    ap.add_argument("--length", type=int, default=512, help="L, positions per sequence")
    ap.add_argument("--top-k", type=int, default=10, help="k, stored entries per source and position")
    ap.add_argument("--temperature", type=float, default=1.0, help="T")
    ap.add_argument("--dense-layout", choices=("sum", "stacked"), default="sum",
                    help="sum: accumulate the K weighted dense tensors; stacked: stack them into [B, L, V, K]")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant; the best is reported")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", help="of the student logits: float32, bfloat16, float16")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    if min(opts.sources, opts.vocab, opts.batch, opts.top_k, opts.repeats, opts.threads) < 1 or opts.length < 2:
        ap.error("--sources, --vocab, --batch, --top-k, --repeats and --threads must be at least 1, --length 2")
    if opts.temperature <= 0:
        ap.error("--temperature must be > 0")
    opts.device = resolve_device(opts.device)
    try:
        opts.dtype = resolve_dtype(opts.dtype, opts.device)
    except ValueError as e:
        ap.error(str(e))
    cuda = opts.device.startswith("cuda")
    if not cuda:
        try:
            CpuMemory().reset()
        except OSError as e:
            raise SystemExit(f"CPU memory is measured through /proc/self/clear_refs (Linux), which failed: {e}")
    torch.set_num_threads(opts.threads)
    where = torch.cuda.get_device_name(torch.device(opts.device)) if cuda else f"CPU, {os.cpu_count()} cores"
    print(f"device: {where} ({opts.device}); torch threads {torch.get_num_threads()}; torch {torch.__version__}")

    B, L, V, K, k = opts.batch, opts.length, opts.vocab, opts.sources, opts.top_k
    dtype_name = str(opts.dtype).replace("torch.", "")
    z_mib = B * L * V * torch.tensor([], dtype=opts.dtype).element_size() / MIB
    print(f"batch: B {B} x L {L}, V {V:,}, K {K} sources, top-k {k}, T {opts.temperature:g}, {dtype_name}, "
          f"seed {opts.seed}; {B * (L - 1):,} labelled positions; z {z_mib:,.1f} MiB (its gradient the same; "
          f"neither counted as loss memory)")

    if not check_agreement(opts):
        raise SystemExit("the sparse and dense losses disagree; no timings")

    where_mem = "allocated CUDA memory" if cuda else "RSS"
    dense_name = f"dense ({opts.dense_layout})"
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    measured: dict[str, tuple[float, float, float]] = {}
    spawn = get_context("spawn")
    workers = {v: ProcessPoolExecutor(1, mp_context=spawn, initializer=_init_worker, initargs=(v, opts))
               for v in VARIANTS}
    try:
        for v in VARIANTS:
            workers[v].submit(_step).result()
            measured[v] = workers[v].submit(_memory_step).result()
        for _ in range(opts.repeats):
            for v in VARIANTS:
                times[v].append(workers[v].submit(_step).result())
    finally:
        for pool in workers.values():
            pool.shutdown()

    best = {v: min(times[v]) for v in VARIANTS}
    peak = {v: max(measured[v][1], measured[v][2]) for v in VARIANTS}
    time_ratio = best["dense"] / best["sparse"]
    memory_ratio = peak["dense"] / peak["sparse"] if peak["sparse"] > 0 else math.inf
    print(f"\n== 2. forward + backward w.r.t. z, each variant in a fresh process: best of {opts.repeats} steps "
          f"after one warm-up; loss memory above z and the batch ({where_mem}, MiB)")
    print(f"{'variant':16} {'loss':>12} {'step ms':>10} {'forward':>9} {'backward':>9} {'peak':>9}")
    for v in VARIANTS:
        value, forward, backward = measured[v]
        print(f"{dense_name if v == 'dense' else v:16} {value:12.6f} {best[v] * 1e3:10.1f} {forward / MIB:9.1f} "
              f"{backward / MIB:9.1f} {peak[v] / MIB:9.1f}")
    print(f"{'dense/sparse':16} {'':>12} {truncated(time_ratio) + 'x':>10} {'':>9} {'':>9} "
          f"{truncated(memory_ratio) + 'x':>9}")
    print("  step ms of every run, in order: " + "; ".join(
        f"{dense_name if v == 'dense' else v} " + ", ".join(f"{t * 1e3:.1f}" for t in times[v]) for v in VARIANTS))

    memory_met, time_met = memory_ratio >= MEMORY_TARGET, time_ratio >= TIME_TARGET
    print(f"\n== 3. targets (the issue), sparse against {dense_name}: "
          f"at least {MEMORY_TARGET:g}x less peak loss memory: {'met' if memory_met else 'NOT met'} "
          f"({truncated(memory_ratio)}x: {peak['sparse'] / MIB:,.1f} vs {peak['dense'] / MIB:,.1f} MiB); "
          f"at least {TIME_TARGET:g}x faster steps: {'met' if time_met else 'NOT met'} "
          f"({truncated(time_ratio)}x: {best['sparse'] * 1e3:,.1f} vs {best['dense'] * 1e3:,.1f} ms)")


if __name__ == "__main__":
    main()
