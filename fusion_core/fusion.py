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


def selection_counts(weights: torch.Tensor) -> torch.Tensor:
    """[K] number of sequences where each source has the largest weight."""
    if weights.ndim != 2 or weights.shape[1] == 0:
        return weights.new_zeros((0,))
    return torch.bincount(weights.detach().argmax(dim=1), minlength=weights.shape[1]).to(torch.float64)


# ---------------------------------------------------------------- losses

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)   # bf16/fp16 -> fp32; fp64 stays fp64


def _log_softmax_at(logits: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., ids] without materialising a second [B,L,V] tensor."""
    return logits.gather(-1, ids) - lse.unsqueeze(-1)


def _kd_from_logits(logits: torch.Tensor, lse: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_logprobs: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    B, L, V = logits.shape
    _, K, _, k = teacher_ids.shape
    dtype = logits.dtype
    valid = torch.isfinite(teacher_logprobs)                                   # [B,K,L,k]
    has = valid.any(dim=-1)                                                    # [B,K,L]
    ids = torch.where(valid, teacher_ids, torch.zeros_like(teacher_ids))
    if bool(valid.any()):
        lo, hi = int(ids[valid].min()), int(ids[valid].max())
        if lo < 0 or hi >= V:
            raise ValueError(f"teacher ids must lie in the student vocabulary [0, {V}); got [{lo}, {hi}]")
    scaled = torch.where(valid, teacher_logprobs.to(dtype) / temperature,
                         torch.full((), -math.inf, dtype=dtype, device=logits.device))
    q = torch.softmax(torch.where(has.unsqueeze(-1), scaled, torch.zeros_like(scaled)), dim=-1)
    q = torch.where(valid, q, torch.zeros_like(q))                             # rows without signal: all 0
    # Student log-probs at every stored (k, j) id: [B, L, K*k] -> [B, K, L, k].
    flat = ids.permute(0, 2, 1, 3).reshape(B, L, K * k)
    lp = _log_softmax_at(logits, lse, flat).reshape(B, L, K, k).permute(0, 2, 1, 3)
    safe_labels = labels.clamp_min(0)
    lp_label = _log_softmax_at(logits, lse, safe_labels.unsqueeze(-1)).squeeze(-1)   # [B, L]
    per_source = (q * lp).sum(-1)                                              # [B,K,L]
    per_source = torch.where(has, per_source, lp_label.unsqueeze(1))           # no signal: one-hot label
    w = weights.to(dtype).unsqueeze(-1)                                        # [B,K,1]
    per_pos = -(w * per_source).sum(1)                                         # [B,L]
    mask = labels != IGNORE_INDEX
    n = mask.sum().clamp_min(1)
    return torch.where(mask, per_pos, torch.zeros_like(per_pos)).sum() / n


def sparse_kd_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                   weights: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the student against the fused sparse teacher distribution.

    student_logits [B,L,V]; teacher_ids / teacher_logprobs [B,K,L,k]; weights [B,K] (rows sum
    to 1); labels [B,L] with -100 where there is no target. Returns the mean over labelled
    positions of -sum_v P[v] log softmax(z)_v, P = sum_k w_k softmax(logprobs_k / T).
    Computed in at least fp32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    logits = student_logits.to(_compute_dtype(student_logits))
    lse = torch.logsumexp(logits, dim=-1)
    return _kd_from_logits(logits, lse, teacher_ids, teacher_logprobs, weights, labels, temperature)


def clm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are already shifted (labels[t] = input_ids[t+1])."""
    logits = student_logits.to(_compute_dtype(student_logits))
    lse = torch.logsumexp(logits, dim=-1)
    return _clm_from_logits(logits, lse, labels)


def _clm_from_logits(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Same value as F.cross_entropy(ignore_index=-100), but 0 (not NaN) when nothing is labelled.
    mask = labels != IGNORE_INDEX
    lp_label = _log_softmax_at(logits, lse, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -torch.where(mask, lp_label, torch.zeros_like(lp_label)).sum() / mask.sum().clamp_min(1)


def fusion_loss(student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor], strategy: FusionStrategy, *,
                clm_weight: float, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The training loss and its parts.

    Returns {"loss", "clm", "kd", <strategy's aux terms>..., "weights"}: loss = clm_weight *
    clm + (1 - clm_weight) * kd + sum(aux). For a strategy that uses no teachers (clm) there is
    no "kd" and loss = clm. "weights" is the [B,K] source weights (detached), for logging.
    """
    labels = batch["labels"]
    logits = student_logits.to(_compute_dtype(student_logits))
    lse = torch.logsumexp(logits, dim=-1)
    clm = _clm_from_logits(logits, lse, labels)
    out: dict[str, torch.Tensor] = {"clm": clm}
    if not strategy.uses_teachers:
        out["loss"] = clm
        out["weights"] = labels.new_zeros((labels.shape[0], 0), dtype=logits.dtype)
        return out
    weights = strategy.source_weights(batch)
    kd = _kd_from_logits(logits, lse, batch["teacher_ids"], batch["teacher_logprobs"], weights, labels, temperature)
    loss = clm if clm_weight >= 1.0 else clm_weight * clm + (1.0 - clm_weight) * kd
    for name, value in strategy.aux_losses(batch, weights).items():
        out[name] = value
        loss = loss + value
    out.update(loss=loss, kd=kd, weights=weights.detach())
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
