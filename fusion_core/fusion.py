"""The fusion objective: batching teacher signals, choosing sources, and the sparse KD loss.

Pure PyTorch. The teacher-inference stage stores, for every TARGET position t of a document,
each source's top-k next-token log-probabilities projected into the target vocabulary
(`FusionExample`). Training fuses them per sequence with source weights w [B, K] chosen by a
strategy, and distils the fused distribution into the student:

    Q_k[b,t]  = softmax(logprobs_k[b,t] / T) over source k's stored ids (renormalised over valid ids)
    P[b,t]    = sum_k w[b,k] Q_k[b,t]                 (on the union of the stored ids)
    L_KD      = mean over labelled (b,t) of  -sum_v P[b,t,v] log softmax(z[b,t])_v
    L         = lambda L_CLM + (1 - lambda) L_KD (+ the strategy's own loss terms)

P is never materialised over the vocabulary: the student's log-probability is gathered at each
stored (k, j) id and weighted by w_k Q_k[j]; duplicated ids across sources simply add up, which
is exactly the union form. Positions where a source has no signal carry the one-hot of the
label (stored so by the teacher stage; an entry with no valid id at all is treated the same
way here), so every labelled position has full weight in L_KD.

Strategies live in one registry, `STRATEGIES` (name -> class). A strategy is an `nn.Module`:
the fixed FuseLLM rules have no parameters, and a learned selector (the adaptive method) can
add parameters and loss terms through the same interface (`source_weights`, `aux_losses`).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---------------------------------------------------------------- data

@dataclass
class FusionExample:
    """One training sequence with its teachers' signals, in the TARGET tokenization.

    input_ids:        int64 [n]; [0] is the start token.
    domain:           the document's domain label.
    teacher_ids:      int64 [K, n, k]; source k's top-k next-token ids at position t, in the
                      target vocabulary. Position t predicts input_ids[t+1].
    teacher_logprobs: float32 [K, n, k]; -inf marks an unused entry.
    teacher_aligned:  bool [K, n]; False: the entry holds the one-hot of the true next token.
    teacher_seq_ce:   float32 [K]; source k's mean next-token CE on the document (own tokenization).

    K may be 0 (plain causal-LM training). Position n-1 has no label.
    """

    input_ids: np.ndarray
    domain: str
    teacher_ids: np.ndarray
    teacher_logprobs: np.ndarray
    teacher_aligned: np.ndarray
    teacher_seq_ce: np.ndarray

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64)
        self.teacher_ids = np.asarray(self.teacher_ids, dtype=np.int64)
        self.teacher_logprobs = np.asarray(self.teacher_logprobs, dtype=np.float32)
        self.teacher_aligned = np.asarray(self.teacher_aligned, dtype=bool)
        self.teacher_seq_ce = np.asarray(self.teacher_seq_ce, dtype=np.float32)
        n = self.input_ids.shape[0] if self.input_ids.ndim == 1 else -1
        if n < 1:
            raise ValueError(f"input_ids must be 1-D and non-empty; got shape {self.input_ids.shape}")
        t_ids, t_lp = self.teacher_ids, self.teacher_logprobs
        if t_ids.ndim != 3 or t_ids.shape[1] != n or t_lp.shape != t_ids.shape:
            raise ValueError(f"teacher_ids {t_ids.shape} and teacher_logprobs {t_lp.shape} must both be [K, {n}, k]")
        K = t_ids.shape[0]
        if self.teacher_aligned.shape != (K, n):
            raise ValueError(f"teacher_aligned has shape {self.teacher_aligned.shape}; expected {(K, n)}")
        if self.teacher_seq_ce.shape != (K,):
            raise ValueError(f"teacher_seq_ce has shape {self.teacher_seq_ce.shape}; expected {(K,)}")

    @classmethod
    def without_teachers(cls, input_ids: np.ndarray, domain: str = "", top_k: int = 1) -> "FusionExample":
        """An example with K = 0 sources (for strategy 'clm')."""
        ids = np.asarray(input_ids, dtype=np.int64)
        n = ids.shape[0]
        return cls(ids, domain, np.zeros((0, n, top_k), np.int64), np.zeros((0, n, top_k), np.float32),
                   np.zeros((0, n), bool), np.zeros((0,), np.float32))

    @property
    def num_sources(self) -> int:
        return int(self.teacher_ids.shape[0])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def source_count(examples: Sequence[FusionExample]) -> int:
    """The number of sources K shared by all examples. Raises ValueError if none or if they differ."""
    if not examples:
        raise ValueError("no examples")
    counts = {ex.num_sources for ex in examples}
    if len(counts) != 1:
        raise ValueError(f"examples have different numbers of sources: {sorted(counts)}")
    return counts.pop()


def collate(examples: Sequence[FusionExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of examples (right padding) into a batch.

    Returns input_ids [B,L], attention_mask [B,L], labels [B,L] (labels[t] = input_ids[t+1];
    -100 at the last real position and at padding), teacher_ids [B,K,L,k] (0 at padding),
    teacher_logprobs [B,K,L,k] (-inf at padding), teacher_aligned [B,K,L] (False at padding),
    seq_ce [B,K], lengths [B]. Examples may differ in k (padded with unused entries) but not in K.
    """
    K = source_count(examples)
    B = len(examples)
    lengths = np.fromiter((len(ex) for ex in examples), dtype=np.int64, count=B)
    L = int(lengths.max())
    k = max(int(ex.teacher_ids.shape[2]) for ex in examples)
    mask = np.arange(L)[None, :] < lengths[:, None]                      # [B, L]
    label_mask = np.arange(L)[None, :] < (lengths[:, None] - 1)          # positions with a next token

    ids_cat = np.concatenate([ex.input_ids for ex in examples])
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    input_ids[mask] = ids_cat
    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1][label_mask[:, :-1]] = input_ids[:, 1:][label_mask[:, :-1]]

    def pad_k(a: np.ndarray, fill) -> np.ndarray:
        if a.shape[2] == k:
            return a
        return np.concatenate([a, np.full(a.shape[:2] + (k - a.shape[2],), fill, a.dtype)], axis=2)

    # Scatter every example's [n, K, k] block into [B, L, K, k] with one boolean-mask assignment.
    t_ids = np.zeros((B, L, K, k), dtype=np.int64)
    t_lp = np.full((B, L, K, k), -np.inf, dtype=np.float32)
    t_al = np.zeros((B, L, K), dtype=bool)
    if K > 0:
        t_ids[mask] = np.concatenate([pad_k(ex.teacher_ids, 0).transpose(1, 0, 2) for ex in examples])
        t_lp[mask] = np.concatenate([pad_k(ex.teacher_logprobs, -np.inf).transpose(1, 0, 2) for ex in examples])
        t_al[mask] = np.concatenate([ex.teacher_aligned.T for ex in examples])
    seq_ce = np.stack([ex.teacher_seq_ce for ex in examples]) if K > 0 else np.zeros((B, 0), np.float32)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "teacher_ids": torch.from_numpy(np.ascontiguousarray(t_ids.transpose(0, 2, 1, 3))),
        "teacher_logprobs": torch.from_numpy(np.ascontiguousarray(t_lp.transpose(0, 2, 1, 3))),
        "teacher_aligned": torch.from_numpy(np.ascontiguousarray(t_al.transpose(0, 2, 1))),
        "seq_ce": torch.from_numpy(np.ascontiguousarray(seq_ce, dtype=np.float32)),
        "lengths": torch.from_numpy(lengths),
    }


# ---------------------------------------------------------------- strategies

class FusionStrategy(nn.Module, abc.ABC):
    """Chooses per-sequence source weights w [B, K] (rows sum to 1).

    Subclasses set `name` and implement `source_weights`. A strategy may own parameters (they
    are trained and checkpointed with the student: `FusionModel` holds both) and may add loss
    terms through `aux_losses`, whose values are already scaled and are added to the total.
    `uses_teachers = False` (strategy 'clm') means no KD term at all.
    """

    name: ClassVar[str] = ""
    uses_teachers: ClassVar[bool] = True
    kd_trains_weights: ClassVar[bool] = True  # False: L_KD's gradient does not reach source_weights

    @classmethod
    def from_config(cls, fusion, source_names: Sequence[str]) -> "FusionStrategy":
        """Build from a FusionConfig and the ordered source names (override to read options)."""
        return cls()

    @abc.abstractmethod
    def source_weights(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-sequence source weights [B, K] for a collated batch."""

    def aux_losses(self, batch: Mapping[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.source_weights(batch)


STRATEGIES: dict[str, type[FusionStrategy]] = {}


def register_strategy(cls: type[FusionStrategy]) -> type[FusionStrategy]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str, **options: Any) -> FusionStrategy:
    """Instantiate a registered strategy. Raises ValueError naming the known ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown fusion strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**options)


def strategy_from_config(fusion, source_names: Sequence[str]) -> FusionStrategy:
    """Build the strategy a FusionConfig asks for. Raises ValueError for an unknown name."""
    if fusion.strategy not in STRATEGIES:
        raise ValueError(f"unknown fusion strategy {fusion.strategy!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[fusion.strategy].from_config(fusion, list(source_names))


def _seq_ce(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    ce = batch["seq_ce"].float()
    if ce.ndim != 2 or ce.shape[1] == 0:
        raise ValueError(f"this strategy needs teacher scores seq_ce [B, K>0]; got shape {tuple(ce.shape)}")
    return torch.nan_to_num(ce, nan=math.inf)   # a source that could not score a document never wins


@register_strategy
class MinCEStrategy(FusionStrategy):
    """FuseLLM MinCE: all weight on the source with the lowest sequence CE (ties: lowest index)."""

    name = "min_ce"

    def source_weights(self, batch):
        ce = _seq_ce(batch)
        return F.one_hot(ce.argmin(dim=1), ce.shape[1]).to(ce.dtype)


@register_strategy
class AvgCEStrategy(FusionStrategy):
    """FuseLLM AvgCE: w = softmax_k(exp(-CE_k)) per sequence."""

    name = "avg_ce"

    def source_weights(self, batch):
        return torch.softmax(torch.exp(-_seq_ce(batch)), dim=1)


@register_strategy
class SingleStrategy(FusionStrategy):
    """All weight on one fixed source."""

    name = "single"

    @classmethod
    def from_config(cls, fusion, source_names):
        if fusion.single_source not in source_names:
            raise ValueError(f"single_source {fusion.single_source!r} is not a source; sources: {list(source_names)}")
        return cls(source_index=list(source_names).index(fusion.single_source))

    def __init__(self, source_index: int = 0):
        super().__init__()
        if source_index < 0:
            raise ValueError(f"source_index must be >= 0; got {source_index}")
        self.source_index = int(source_index)

    def source_weights(self, batch):
        ce = batch["seq_ce"]
        K = ce.shape[1]
        if self.source_index >= K:
            raise ValueError(f"source_index {self.source_index} out of range for {K} sources")
        return F.one_hot(torch.full((ce.shape[0],), self.source_index, dtype=torch.long, device=ce.device),
                         K).float()


@register_strategy
class CLMStrategy(FusionStrategy):
    """No teacher: plain causal-LM training on the same data."""

    name = "clm"
    uses_teachers = False

    def source_weights(self, batch):
        return batch["seq_ce"].new_zeros((batch["seq_ce"].shape[0], 0))


def _teacher_q(teacher_logprobs: torch.Tensor, temperature: float, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each source's stored distribution: (valid [B,K,L,k] entries, has [B,K,L] any valid entry,
    Q = softmax(logprobs / T) renormalised over the valid entries, 0 elsewhere and on rows without
    signal), in `dtype`."""
    valid = torch.isfinite(teacher_logprobs)
    has = valid.any(dim=-1)
    scaled = torch.where(valid, teacher_logprobs.to(dtype) / temperature,
                         torch.full((), -math.inf, dtype=dtype, device=teacher_logprobs.device))
    q = torch.softmax(torch.where(has.unsqueeze(-1), scaled, torch.zeros_like(scaled)), dim=-1)
    return valid, has, torch.where(valid, q, torch.zeros_like(q))


def teacher_label_probs(batch: Mapping[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Q_k[b,t,label_t]: each source's probability of the true next target token, [B,K,L].

    From the stored top-k (softmax(logprobs / T) over the valid entries, duplicates added); 0
    where the label is not among them, and at padding. At a position with no teacher signal the
    stored one-hot of the label gives 1.
    """
    ids, labels = batch["teacher_ids"], batch["labels"]
    _, _, q = _teacher_q(batch["teacher_logprobs"], temperature, torch.float32)
    hit = ids == labels.clamp_min(0)[:, None, :, None]
    return (q * hit).sum(-1) * (labels != IGNORE_INDEX)[:, None, :]


def build_selector(num_sources: int, hidden: Sequence[int] | None = None) -> nn.Sequential:
    """The selection MLP: Linear(K, h1) -> GELU -> ... -> Linear(h_last, K).

    hidden None: the reference shape, Linear(K,2K) -> GELU -> Linear(2K,K) -> GELU -> Linear(K,K).
    """
    K = int(num_sources)
    if K < 1:
        raise ValueError("the selector needs at least one source")
    widths = [K, *(hidden if hidden is not None else (2 * K, K)), K]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


@register_strategy
class AdaptiveStrategy(FusionStrategy):
    """The adaptive selection network of Kong et al. 2025 (METHOD.md), as a trained module.

    g = softmax(MLP(r)), r_k = exp(-CE_k) per sequence (scores="sequence") or, per position
    (scores="token"), the source's probability of the true next target token where it has a
    signal there and exp(-CE_k) of the sequence where it does not. Sources with g_k > tau are
    kept (the best one if none passes), w = g * mask renormalised. The MLP's parameters are
    part of this module, so they are in the optimizer, in every checkpoint and in the saved
    model (`fusion_strategy.safetensors`); the public code re-created it with random weights
    in every loss call.

    Loss terms (aux_losses): "feedback" = beta * CV^2 of the per-source importance
    Imp_k = sum of w_k over the batch's sequences (or labelled positions), the squared
    coefficient of variation with the population variance; and, with objective="likelihood",
    "selector_nll" = -mean log sum_k w_k Q_k[label] over labelled positions: the fused
    distribution's likelihood of the true next token, which trains the selector only (the
    teachers are fixed and the student is not in it), while L_KD's gradient is kept from the
    weights. objective="kd" is the paper's: the selector is trained through L_KD (+ feedback),
    which rewards the sources the student already agrees with.
    """

    name = "adaptive"
    EPS = 1e-8

    FIXED: ClassVar[dict[str, str]] = {}  # options a subclass does not take from the config

    @classmethod
    def from_config(cls, fusion, source_names):
        a = fusion.adaptive
        options = {"objective": a.objective, "scores": a.scores, **cls.FIXED}
        return cls(len(source_names), tau=a.tau, hidden=a.hidden, feedback_weight=a.feedback_weight,
                   temperature=fusion.temperature, seed=fusion.training.seed, **options)

    def __init__(self, num_sources: int, *, tau: float = 0.15, hidden: Sequence[int] | None = None,
                 feedback_weight: float = 0.5, objective: str = "likelihood", scores: str = "sequence",
                 temperature: float = 1.0, seed: int = 0):
        super().__init__()
        if not 0 < tau < 1:
            raise ValueError(f"tau must lie in (0, 1); got {tau}")
        if feedback_weight < 0:
            raise ValueError(f"feedback_weight must be >= 0; got {feedback_weight}")
        if objective not in ("likelihood", "kd"):
            raise ValueError(f"objective must be 'likelihood' or 'kd'; got {objective!r}")
        if scores not in ("sequence", "token"):
            raise ValueError(f"scores must be 'sequence' or 'token'; got {scores!r}")
        self.num_sources, self.tau, self.feedback_weight = int(num_sources), float(tau), float(feedback_weight)
        self.objective, self.scores, self.temperature = objective, scores, float(temperature)
        self.hidden = None if hidden is None else [int(h) for h in hidden]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.selector = build_selector(self.num_sources, self.hidden)

    @property
    def kd_trains_weights(self) -> bool:  # type: ignore[override]
        return self.objective == "kd"

    def _gate(self, batch) -> nn.Module:
        return self.selector

    def scores_of(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """r: [B,K] per sequence, or [B,K,L] per position."""
        r = torch.exp(-_seq_ce(batch))
        if r.shape[1] != self.num_sources:
            raise ValueError(f"the selector was built for {self.num_sources} sources; the batch has {r.shape[1]}")
        if self.scores == "sequence":
            return r
        q = teacher_label_probs(batch, self.temperature)                        # [B,K,L]
        return torch.where(batch["teacher_aligned"], q, r.unsqueeze(-1).expand_as(q))

    def gate(self, r: torch.Tensor, selector: nn.Module) -> torch.Tensor:
        """g = softmax(MLP(r)) over the sources; r [B,K] or [B,K,L]."""
        param = next(selector.parameters())
        x = r.to(param.dtype)
        if x.ndim == 3:
            return torch.softmax(selector(x.transpose(1, 2)), dim=-1).transpose(1, 2)
        return torch.softmax(selector(x), dim=-1)

    def source_weights(self, batch):
        g = self.gate(self.scores_of(batch), self._gate(batch))
        keep = g > self.tau
        best = F.one_hot(g.argmax(dim=1), g.shape[1]).movedim(-1, 1).bool()
        keep = torch.where(keep.any(dim=1, keepdim=True), keep, best)
        w = g * keep
        return w / (w.sum(dim=1, keepdim=True) + self.EPS)

    def aux_losses(self, batch, weights):
        out: dict[str, torch.Tensor] = {}
        labelled = (batch["labels"] != IGNORE_INDEX)
        w = weights.float()
        if self.feedback_weight > 0:
            imp = w.sum(0) if w.ndim == 2 else (w * labelled[:, None, :]).sum(dim=(0, 2))
            cv2 = imp.var(correction=0) / (imp.mean() ** 2 + 1e-10)
            out["feedback"] = self.feedback_weight * cv2
        if self.objective == "likelihood":
            q = teacher_label_probs(batch, self.temperature)                     # [B,K,L]
            ww = w.unsqueeze(-1) if w.ndim == 2 else w
            fused = (ww * q).sum(1)                                              # [B,L]
            nll = -torch.log(fused + self.EPS)
            out["selector_nll"] = torch.where(labelled, nll, torch.zeros_like(nll)).sum() / labelled.sum().clamp_min(1)
        return out


@register_strategy
class ReferenceStrategy(AdaptiveStrategy):
    """The public reference code's behaviour, kept only to measure against: the selection MLP is
    created afresh, randomly initialised, at every loss computation, so it is never trained
    (its feedback term is computed and logged but reaches no parameter). Its stream of random
    gates is seeded from training.seed and restarts with a resumed run."""

    name = "reference"
    FIXED = {"objective": "kd", "scores": "sequence"}

    def __init__(self, num_sources: int, **kwargs):
        super().__init__(num_sources, **kwargs)
        del self.selector  # no persistent parameters
        self._generator = torch.Generator().manual_seed(int(kwargs.get("seed", 0)))

    def _gate(self, batch) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._generator)))
            return build_selector(self.num_sources, self.hidden).to(batch["seq_ce"].device)


def selection_counts(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per source over the sequences of a batch, from per-sequence weights [B,K]: ([K] sequences
    that select it, [K] the sum of its weights). A sequence selects a source when the source's
    weight is above zero (the adaptive threshold zeroes the others; min_ce and single select
    one; avg_ce all)."""
    w = weights.detach().to(torch.float64)
    if w.ndim != 2 or w.shape[1] == 0:
        return w.new_zeros((0,)), w.new_zeros((0,))
    return (w > 0).sum(0).to(torch.float64), w.sum(0)


# ---------------------------------------------------------------- losses

_CHUNK_BYTES = 1 << 22  # rows of logits handled at once: about 4 MiB of work memory


class _SparseCrossEntropy(torch.autograd.Function):
    """sum over positions (b, t) and entries j of probs[b,t,j] * -log softmax(z[b,t])[ids[b,t,j]].

    = sum c[b,t] * lse(z[b,t]) - sum probs * z[ids], c = sum_j probs. The only full-size tensor it
    creates is the gradient w.r.t. z itself, written row chunk by row chunk as
    c * softmax(z) - scatter(probs at ids); the log-sum-exps are taken a chunk of rows at a time
    as well. Autograd through logsumexp and gather would hold three more [B, L, V] buffers
    (benchmarks/kd.py). probs may require grad (selector weights trained through L_KD): its
    gradient is -log softmax(z)[ids]. Reduced in at least fp32 (fp64 stays fp64).
    """

    @staticmethod
    def forward(ctx, logits, ids, probs):
        cd = torch.promote_types(logits.dtype, torch.float32)
        flat = logits.detach().reshape(-1, logits.shape[-1])
        rows = max(1, _CHUNK_BYTES // (flat.shape[1] * 4))
        lse = torch.empty(flat.shape[0], dtype=cd, device=logits.device)
        for r0 in range(0, flat.shape[0], rows):
            lse[r0:r0 + rows] = torch.logsumexp(flat[r0:r0 + rows].to(cd), dim=-1)
        lse = lse.reshape(logits.shape[:-1])
        neg_logp = lse.unsqueeze(-1) - logits.detach().gather(-1, ids).to(cd)   # [B, L, M]
        ctx.save_for_backward(logits, ids, probs, lse, neg_logp)
        ctx.mark_non_differentiable(neg_logp)
        return (probs.to(cd) * neg_logp).sum(), neg_logp

    @staticmethod
    def backward(ctx, grad_out, _grad_neg_logp):
        logits, ids, probs, lse, neg_logp = ctx.saved_tensors
        cd = lse.dtype
        grad_logits = grad_probs = None
        if ctx.needs_input_grad[0]:
            V = logits.shape[-1]
            flat = logits.detach().reshape(-1, V)
            grad = torch.empty_like(logits).reshape(-1, V)
            g = grad_out.to(cd)
            p_flat = probs.detach().to(cd).reshape(flat.shape[0], -1) * g
            c = p_flat.sum(-1)
            i_flat = ids.reshape(flat.shape[0], -1)
            l_flat = lse.reshape(-1)
            rows = max(1, _CHUNK_BYTES // (V * 4))
            for r0 in range(0, flat.shape[0], rows):
                sl = slice(r0, r0 + rows)
                chunk = torch.exp(flat[sl].to(cd) - l_flat[sl, None]).mul_(c[sl, None])
                chunk.scatter_add_(1, i_flat[sl], -p_flat[sl])
                grad[sl] = chunk.to(grad.dtype)
            grad_logits = grad.reshape(logits.shape)
        if ctx.needs_input_grad[2]:
            grad_probs = (neg_logp * grad_out.to(cd)).to(probs.dtype)
        return grad_logits, None, grad_probs


def sparse_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_{b,t,j} probs[b,t,j] * -log softmax(logits[b,t])[ids[b,t,j]], computed without any
    [B, L, V] temporary beyond the gradient (see `_SparseCrossEntropy`), and the per-entry
    -log softmax(logits)[ids] [B,L,M] (no gradient). logits [B,L,V] (any float dtype; reduced
    in fp32), ids [B,L,M] int64, probs [B,L,M] (0 for unused entries)."""
    return _SparseCrossEntropy.apply(logits, ids, probs)


def _teacher_entries(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, weights: torch.Tensor,
                     labels: torch.Tensor, V: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused teacher distribution P as entries: ids [B,L,K*k+K] and probabilities w_k Q_k[j]
    (+ w_k on the label for a source without signal at the position), 0 at unlabelled positions."""
    B, K, L, k = teacher_ids.shape
    cd = torch.promote_types(weights.dtype, torch.float32)
    valid, has, q = _teacher_q(teacher_logprobs, temperature, cd)              # [B,K,L,k], [B,K,L], [B,K,L,k]
    ids = torch.where(valid, teacher_ids, torch.zeros_like(teacher_ids))
    if bool(valid.any()):
        lo, hi = int(ids[valid].min()), int(ids[valid].max())
        if lo < 0 or hi >= V:
            raise ValueError(f"teacher ids must lie in the student vocabulary [0, {V}); got [{lo}, {hi}]")
    w = weights.to(cd)
    w = w.unsqueeze(-1) if w.ndim == 2 else w                                  # [B,K,1] or [B,K,L]
    labelled = (labels != IGNORE_INDEX)
    probs = q * w.unsqueeze(-1)                                                # [B,K,L,k]
    fallback = torch.where(has, torch.zeros_like(w.expand(B, K, L)), w.expand(B, K, L))  # [B,K,L]
    all_ids = torch.cat([ids.permute(0, 2, 1, 3).reshape(B, L, K * k),
                         labels.clamp_min(0).unsqueeze(-1).expand(B, L, K)], dim=-1)
    all_probs = torch.cat([probs.permute(0, 2, 1, 3).reshape(B, L, K * k), fallback.permute(0, 2, 1)], dim=-1)
    return all_ids, all_probs * labelled.unsqueeze(-1)


def sparse_kd_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                   weights: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the student against the fused sparse teacher distribution.

    student_logits [B,L,V]; teacher_ids / teacher_logprobs [B,K,L,k]; weights [B,K] per
    sequence or [B,K,L] per position (summing to 1 over K); labels [B,L] with -100 where there
    is no target. Returns the mean over labelled positions of -sum_v P[v] log softmax(z)_v,
    P = sum_k w_k softmax(logprobs_k / T) on the union of the stored ids. Computed in fp32
    without materialising P or any other [B,L,V] tensor but the gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    ids, probs = _teacher_entries(teacher_ids, teacher_logprobs, weights, labels, student_logits.shape[-1],
                                  temperature)
    n = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return sparse_cross_entropy(student_logits, ids, probs)[0] / n


def clm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are already shifted (labels[t] = input_ids[t+1]).
    Same value as F.cross_entropy(ignore_index=-100), but 0 (not NaN) when nothing is labelled."""
    labelled = labels != IGNORE_INDEX
    n = labelled.sum().clamp_min(1)
    return sparse_cross_entropy(student_logits, labels.clamp_min(0).unsqueeze(-1),
                                labelled.unsqueeze(-1).float())[0] / n


def fusion_loss(student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor], strategy: FusionStrategy, *,
                clm_weight: float, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The training loss and its parts.

    Returns {"loss", "clm", "kd", <strategy's aux terms>..., "weights"}: loss = clm_weight *
    clm + (1 - clm_weight) * kd + sum(aux). For a strategy that uses no teachers (clm) there
    is no "kd" and loss = clm. "clm" and "kd" are their values (detached; "loss" carries the
    gradient): both are one sparse cross-entropy over the label and the teachers' entries,
    so the student's gradient is built once. "weights" is the [B,K] source weights (detached;
    per-position weights averaged over each sequence's labelled positions), for logging.
    The KD term reaches the weights' parameters only when the strategy says so
    (`kd_trains_weights`: the paper's objective); otherwise its own aux terms train them.
    """
    labels = batch["labels"]
    labelled = labels != IGNORE_INDEX
    n = labelled.sum().clamp_min(1)
    label_ids = labels.clamp_min(0).unsqueeze(-1)
    label_probs = labelled.unsqueeze(-1).float()
    if not strategy.uses_teachers:
        clm = clm_loss(student_logits, labels)
        return {"clm": clm.detach(), "loss": clm,
                "weights": labels.new_zeros((labels.shape[0], 0), dtype=torch.float32)}
    weights = strategy.source_weights(batch)
    kd_weights = weights if strategy.kd_trains_weights else weights.detach()
    t_ids, t_probs = _teacher_entries(batch["teacher_ids"], batch["teacher_logprobs"], kd_weights, labels,
                                      student_logits.shape[-1], temperature)
    lam = float(clm_weight)
    ids = torch.cat([label_ids, t_ids], dim=-1)
    probs = torch.cat([label_probs * lam, t_probs * (1.0 - lam)], dim=-1) / n
    loss, neg_logp = sparse_cross_entropy(student_logits, ids, probs)
    with torch.no_grad():  # the two parts' values, from the same log-probabilities
        clm = (neg_logp[..., 0] * label_probs[..., 0]).sum() / n
        kd = (neg_logp[..., 1:] * t_probs.detach()).sum() / n
    out: dict[str, torch.Tensor] = {"clm": clm, "kd": kd}
    for name, value in strategy.aux_losses(batch, weights).items():
        out[name] = value
        loss = loss + value
    logged = weights.detach()
    if logged.ndim == 3:  # per position: each sequence's mean over its labelled positions
        m = labelled[:, None, :].to(logged.dtype)
        logged = (logged * m).sum(-1) / m.sum(-1).clamp_min(1)
    out.update(loss=loss, weights=logged)
    return out


class FusionModel(nn.Module):
    """Student + strategy in one module, so DeepSpeed trains and checkpoints both.

    forward(**batch) -> fusion_loss(...) dict.
    """

    BATCH_KEYS = ("input_ids", "attention_mask", "labels", "teacher_ids", "teacher_logprobs",
                  "teacher_aligned", "seq_ce")

    def __init__(self, student: nn.Module, strategy: FusionStrategy, *, clm_weight: float, temperature: float):
        super().__init__()
        self.student = student
        self.strategy = strategy
        self.clm_weight = float(clm_weight)
        self.temperature = float(temperature)

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return fusion_loss(out.logits, batch, self.strategy, clm_weight=self.clm_weight,
                           temperature=self.temperature)
