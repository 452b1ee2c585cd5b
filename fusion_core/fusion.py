"""The fusion objective: batching teacher signals, choosing sources, and the sparse KD loss.

Pure PyTorch. The teacher-inference stage stores, for every TARGET position t of a document,
each source's top-k next-token log-probabilities projected into the target vocabulary
(`FusionExample`). Training fuses them per sequence with source weights w [B, K] chosen by a
strategy, and distils the fused distribution into the student:

    Q_k[b,t]  = softmax(logprobs_k[b,t]) over source k's stored ids (renormalised over valid ids);
                the stored log-probabilities already are log_softmax(logits / T_teacher): the
                temperature is applied once, when the teachers score, never again here
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
# Alignment labels (fusion_core.alignment) at which a source's distribution predicts exactly the
# target's next token: the same boundary, next tokens that end together and map onto each other.
# Marginal and text-projected positions (the other labels) are biased upward on the true token.
EXACT_LABELS = (0,)  # alignment.ONE_TO_ONE_EXACT (kept as a literal: fusion imports no alignment code)


# ---------------------------------------------------------------- data

@dataclass
class FusionExample:
    """One training sequence with its teachers' signals, in the TARGET tokenization.

    input_ids:           int64 [n]; [0] is the start token.
    domain:              the document's domain label.
    teacher_ids:         int64 [K, n, k]; source k's top-k next-token ids at position t, in the
                         target vocabulary. Position t predicts input_ids[t+1].
    teacher_logprobs:    float32 [K, n, k]; -inf marks an unused entry.
    teacher_aligned:     bool [K, n]; False: the entry holds the one-hot of the true next token.
    teacher_nll_per_byte: float32 [K]; source k's NLL (nats) per UTF-8 byte of the document, in its
                         own tokenization: the score strategies compare (NaN: could not score).
    teacher_label:       uint8 [K, n] or None; the alignment label realised at each position
                         (`alignment.LABEL_NAMES`). None (examples built by hand): every aligned
                         position counts as exactly aligned.

    K may be 0 (plain causal-LM training). Position n-1 has no label.
    """

    input_ids: np.ndarray
    domain: str
    teacher_ids: np.ndarray
    teacher_logprobs: np.ndarray
    teacher_aligned: np.ndarray
    teacher_nll_per_byte: np.ndarray
    teacher_label: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64)
        self.teacher_ids = np.asarray(self.teacher_ids, dtype=np.int64)
        self.teacher_logprobs = np.asarray(self.teacher_logprobs, dtype=np.float32)
        self.teacher_aligned = np.asarray(self.teacher_aligned, dtype=bool)
        self.teacher_nll_per_byte = np.asarray(self.teacher_nll_per_byte, dtype=np.float32)
        n = self.input_ids.shape[0] if self.input_ids.ndim == 1 else -1
        if n < 1:
            raise ValueError(f"input_ids must be 1-D and non-empty; got shape {self.input_ids.shape}")
        t_ids, t_lp = self.teacher_ids, self.teacher_logprobs
        if t_ids.ndim != 3 or t_ids.shape[1] != n or t_lp.shape != t_ids.shape:
            raise ValueError(f"teacher_ids {t_ids.shape} and teacher_logprobs {t_lp.shape} must both be [K, {n}, k]")
        K = t_ids.shape[0]
        if self.teacher_aligned.shape != (K, n):
            raise ValueError(f"teacher_aligned has shape {self.teacher_aligned.shape}; expected {(K, n)}")
        if self.teacher_nll_per_byte.shape != (K,):
            raise ValueError(f"teacher_nll_per_byte has shape {self.teacher_nll_per_byte.shape}; expected {(K,)}")
        if self.teacher_label is not None:
            self.teacher_label = np.asarray(self.teacher_label, dtype=np.uint8)
            if self.teacher_label.shape != (K, n):
                raise ValueError(f"teacher_label has shape {self.teacher_label.shape}; expected {(K, n)}")

    @property
    def teacher_exact(self) -> np.ndarray:
        """bool [K, n]: positions where the source's distribution is exactly aligned (EXACT_LABELS)."""
        if self.teacher_label is None:
            return self.teacher_aligned.copy()
        return np.isin(self.teacher_label, EXACT_LABELS)

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
    teacher_exact [B,K,L] (exactly aligned, `EXACT_LABELS`; False at padding), nll_per_byte [B,K],
    lengths [B]. Examples may differ in k (padded with unused entries) but not in K.
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
    t_ex = np.zeros((B, L, K), dtype=bool)
    if K > 0:
        t_ids[mask] = np.concatenate([pad_k(ex.teacher_ids, 0).transpose(1, 0, 2) for ex in examples])
        t_lp[mask] = np.concatenate([pad_k(ex.teacher_logprobs, -np.inf).transpose(1, 0, 2) for ex in examples])
        t_al[mask] = np.concatenate([ex.teacher_aligned.T for ex in examples])
        t_ex[mask] = np.concatenate([ex.teacher_exact.T for ex in examples])
    nll = np.stack([ex.teacher_nll_per_byte for ex in examples]) if K > 0 else np.zeros((B, 0), np.float32)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "teacher_ids": torch.from_numpy(np.ascontiguousarray(t_ids.transpose(0, 2, 1, 3))),
        "teacher_logprobs": torch.from_numpy(np.ascontiguousarray(t_lp.transpose(0, 2, 1, 3))),
        "teacher_aligned": torch.from_numpy(np.ascontiguousarray(t_al.transpose(0, 2, 1))),
        "teacher_exact": torch.from_numpy(np.ascontiguousarray(t_ex.transpose(0, 2, 1))),
        "nll_per_byte": torch.from_numpy(np.ascontiguousarray(nll, dtype=np.float32)),
        "lengths": torch.from_numpy(lengths),
    }


# ---------------------------------------------------------------- strategies

class FusionStrategy(nn.Module, abc.ABC):
    """Chooses per-sequence source weights w [B, K] (rows sum to 1).

    Subclasses set `name` and implement `source_weights`. A strategy may own parameters (they
    are trained and checkpointed with the student: `FusionModel` holds both) and may add loss
    terms through `aux_losses`, whose values are already scaled and are added to the total.
    `uses_teachers = False` (strategy 'clm') means no KD term at all. `prepare(examples)` is
    called once with the training examples before training (a learned selector fits its input
    statistics and balance target there); it does nothing for the fixed rules.
    """

    name: ClassVar[str] = ""
    uses_teachers: ClassVar[bool] = True
    kd_trains_weights: ClassVar[bool] = True  # False: L_KD's gradient does not reach source_weights

    @classmethod
    def from_config(cls, fusion, source_names: Sequence[str]) -> "FusionStrategy":
        """Build from a FusionConfig and the ordered source names (override to read options)."""
        return cls()

    def prepare(self, examples: Sequence["FusionExample"]) -> None:
        """Fit whatever the strategy takes from the training data before training (default: nothing)."""

    @abc.abstractmethod
    def source_weights(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-sequence source weights [B, K] for a collated batch."""

    def select(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, gate): the weights that fuse the teachers and the unthresholded gate behind
        them (for the fixed rules the gate is the weights)."""
        w = self.source_weights(batch)
        return w, w

    def aux_losses(self, batch: Mapping[str, torch.Tensor], weights: torch.Tensor,
                   gate: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
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


def sequence_scores(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each source's NLL per byte of each sequence, [B, K] (nats; +inf where a source could not
    score the document, so it never wins). Raises ValueError when the batch has no teachers."""
    nll = batch["nll_per_byte"].float()
    if nll.ndim != 2 or nll.shape[1] == 0:
        raise ValueError(f"this strategy needs teacher scores nll_per_byte [B, K>0]; got shape {tuple(nll.shape)}")
    return torch.nan_to_num(nll, nan=math.inf, posinf=math.inf)


def oracle_routing(nll_per_byte: torch.Tensor) -> torch.Tensor:
    """The per-document oracle: the index of the source with the lowest NLL per byte, [B]."""
    return torch.nan_to_num(nll_per_byte.float(), nan=math.inf).argmin(dim=-1)


@register_strategy
class MinCEStrategy(FusionStrategy):
    """FuseLLM MinCE, scored per byte: all weight on the source with the lowest NLL per byte of the
    sequence (ties: lowest index). This is exactly the per-document oracle routing."""

    name = "min_ce"

    def source_weights(self, batch):
        nll = sequence_scores(batch)
        return F.one_hot(nll.argmin(dim=1), nll.shape[1]).to(nll.dtype)


@register_strategy
class AvgCEStrategy(FusionStrategy):
    """FuseLLM AvgCE, scored per byte: w = softmax_k(r_k), r_k = exp(-NLL_k per byte)."""

    name = "avg_ce"

    def source_weights(self, batch):
        return torch.softmax(torch.exp(-sequence_scores(batch)), dim=1)


@register_strategy
class UniformStrategy(FusionStrategy):
    """Every source weighted 1/K on every sequence: the ablation with no selection at all."""

    name = "uniform"

    def source_weights(self, batch):
        nll = sequence_scores(batch)
        return torch.full_like(nll, 1.0 / nll.shape[1])


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
        nll = batch["nll_per_byte"]
        K = nll.shape[1]
        if self.source_index >= K:
            raise ValueError(f"source_index {self.source_index} out of range for {K} sources")
        return F.one_hot(torch.full((nll.shape[0],), self.source_index, dtype=torch.long, device=nll.device),
                         K).float()


@register_strategy
class CLMStrategy(FusionStrategy):
    """No teacher: plain causal-LM training on the same data."""

    name = "clm"
    uses_teachers = False

    def source_weights(self, batch):
        return batch["nll_per_byte"].new_zeros((batch["nll_per_byte"].shape[0], 0))


def _teacher_q(teacher_logprobs: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each source's stored distribution: (valid [B,K,L,k] entries, has [B,K,L] any valid entry,
    Q = softmax(stored log-probabilities) renormalised over the valid entries, 0 elsewhere and on
    rows without signal), in `dtype`. The stored values are log_softmax(logits / T_teacher): the
    temperature was applied when the teacher scored and is not applied again."""
    valid = torch.isfinite(teacher_logprobs)
    has = valid.any(dim=-1)
    scaled = torch.where(valid, teacher_logprobs.to(dtype),
                         torch.full((), -math.inf, dtype=dtype, device=teacher_logprobs.device))
    q = torch.softmax(torch.where(has.unsqueeze(-1), scaled, torch.zeros_like(scaled)), dim=-1)
    return valid, has, torch.where(valid, q, torch.zeros_like(q))


def teacher_label_probs(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Q_k[b,t,label_t]: each source's probability of the true next target token, [B,K,L].

    From the stored top-k (renormalised over the valid entries, duplicates added); 0 where the
    label is not among them, and at padding. At a position with no teacher signal the stored
    one-hot of the label gives 1 (which is why an objective on it must be restricted to exactly
    aligned positions: `AdaptiveStrategy`).
    """
    ids, labels = batch["teacher_ids"], batch["labels"]
    _, _, q = _teacher_q(batch["teacher_logprobs"], torch.float32)
    hit = ids == labels.clamp_min(0)[:, None, :, None]
    return (q * hit).sum(-1) * (labels != IGNORE_INDEX)[:, None, :]


def teacher_confidence(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each source's own confidence at each position, log max_v Q_k[b,t,v], [B,K,L]: a label-free
    per-token score (it never looks at the true next token). 0 where the source has no signal."""
    _, has, q = _teacher_q(batch["teacher_logprobs"], torch.float32)
    conf = torch.log(q.amax(dim=-1).clamp_min(1e-12))
    return torch.where(has & batch["teacher_aligned"], conf, torch.zeros_like(conf))


def build_selector(num_sources: int, hidden: Sequence[int] | None = None, *, num_inputs: int | None = None
                   ) -> nn.Sequential:
    """The selection MLP: Linear(inputs, h1) -> GELU -> ... -> Linear(h_last, K).

    hidden None: the reference shape, Linear(K,2K) -> GELU -> Linear(2K,K) -> GELU -> Linear(K,K).
    num_inputs: K per-sequence scores (the default), or 2K with a per-token score beside each.
    """
    K = int(num_sources)
    if K < 1:
        raise ValueError("the selector needs at least one source")
    widths = [int(num_inputs or K), *(hidden if hidden is not None else (2 * K, K)), K]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class RunningStandardizer(nn.Module):
    """x -> (x - mean) / std per feature, with mean and std as buffers (checkpointed with the model).

    `fit(values)` sets them from data and freezes them (the selector's per-sequence scores are
    known for every training document before training starts); otherwise, in training mode,
    they are running estimates over every value seen (Chan's parallel update), frozen in eval.
    """

    def __init__(self, features: int, min_std: float = 1e-3):
        super().__init__()
        self.min_std = float(min_std)
        self.register_buffer("mean", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(features, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def std(self) -> torch.Tensor:
        var = self.m2 / self.count.clamp_min(1.0)
        # nothing seen yet (an untrained selector used as it is): the identity, not a division by ~0
        return torch.where(self.count >= 2, var.sqrt().clamp_min(self.min_std), torch.ones_like(var))

    @torch.no_grad()
    def _update(self, x: torch.Tensor, valid: torch.Tensor) -> None:
        # x, valid: [N, F]
        xv = torch.where(valid, x, torch.zeros_like(x)).to(torch.float64)
        n = valid.sum(0).to(torch.float64)
        ok = n > 0
        mean_b = xv.sum(0) / n.clamp_min(1.0)
        m2_b = (torch.where(valid, x.to(torch.float64) - mean_b, torch.zeros_like(xv)) ** 2).sum(0)
        tot = self.count + n
        delta = mean_b - self.mean
        new_mean = self.mean + delta * n / tot.clamp_min(1.0)
        new_m2 = self.m2 + m2_b + delta ** 2 * self.count * n / tot.clamp_min(1.0)
        self.mean.copy_(torch.where(ok, new_mean, self.mean))
        self.m2.copy_(torch.where(ok, new_m2, self.m2))
        self.count.copy_(tot)

    @torch.no_grad()
    def fit(self, values: torch.Tensor) -> None:
        """Set mean and std from values [N, F] (non-finite entries ignored) and freeze them."""
        values = torch.as_tensor(values, dtype=torch.float64)
        self.mean.zero_(), self.m2.zero_(), self.count.zero_()
        self._update(values, torch.isfinite(values))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Standardise x [..., F] (valid: where x is a real value; others come out 0)."""
        valid = torch.isfinite(x) if valid is None else valid & torch.isfinite(x)
        if self.training and not bool(self.fitted):
            self._update(x.detach().reshape(-1, x.shape[-1]), valid.reshape(-1, x.shape[-1]))
        z = (x.to(torch.float64) - self.mean) / self.std
        return torch.where(valid, z, torch.zeros_like(z)).to(x.dtype if x.is_floating_point() else torch.float32)


@register_strategy
class AdaptiveStrategy(FusionStrategy):
    """The adaptive selection network of Kong et al. 2025 (docs/method.md), as a trained module.

    Inputs x: the standardised per-sequence score, x_k = (-NLL_k per byte - mu_k) / sigma_k
    (mu, sigma fitted on the training documents before training, `prepare`); the paper's
    r = exp(-CE) differs by a few thousandths between sources and barely moves an MLP at
    initialisation. scores="confidence" adds, per position, each source's standardised own
    confidence log max_v Q_k[t, v] (label-free); scores="oracle_token" adds its probability of
    the TRUE next token instead: an oracle that looks at the label, for ablations only.

    g = softmax(MLP(x)); sources with g_k > tau are kept (the best one if none passes), w = g *
    mask renormalised. The MLP's parameters are part of this module, so they are in the
    optimizer, in every checkpoint and in the saved model (`fusion_strategy.safetensors`); the
    public code re-created it with random weights in every loss call.

    Loss terms (aux_losses):
    - "feedback" = beta * K sum_k (s_k - pi_k)^2, s the share of the importance Imp_k = sum of
      the gate g_k (BEFORE the threshold, so a source below tau still gets gradient) over a
      running window of about `feedback_window` sequences, this batch included (`_balance`):
      with pi uniform this is the squared coefficient of variation of Shazeer et al. 2017, and
      over a window batch composition alone does not look like imbalance; pi is uniform
      (feedback_target="uniform") or the data's mix (feedback_target="data": the share of
      training documents each source is best on by NLL per byte), so one-source-per-domain
      routing is not pushed toward uniform mixing.
    - objective="likelihood": "selector_nll" = -mean log sum_k w_k Q_k[label] over the positions
      where EVERY source is exactly aligned (elsewhere a source's Q is the one-hot of the label or
      biased upward, which would pay the selector for picking the worst-aligned source). It trains
      the selector only; L_KD's gradient is kept from the weights. objective="kd" is the paper's:
      the selector is trained through L_KD (+ feedback), which rewards the sources the student
      already agrees with.
    """

    name = "adaptive"
    EPS = 1e-8
    SCORES = ("sequence", "confidence", "oracle_token")

    FIXED: ClassVar[dict[str, str]] = {}  # options a subclass does not take from the config

    @classmethod
    def from_config(cls, fusion, source_names):
        a = fusion.adaptive
        options = {"objective": a.objective, "scores": a.scores, "feedback_target": a.feedback_target,
                   "feedback_window": a.feedback_window, "fit_steps": a.fit_steps,
                   "fit_learning_rate": a.fit_learning_rate, **cls.FIXED}
        return cls(len(source_names), tau=a.tau, hidden=a.hidden, feedback_weight=a.feedback_weight,
                   seed=fusion.training.seed, **options)

    def __init__(self, num_sources: int, *, tau: float = 0.15, hidden: Sequence[int] | None = None,
                 feedback_weight: float = 0.5, objective: str = "likelihood", scores: str = "sequence",
                 feedback_target: str = "data", feedback_window: int = 256, seed: int = 0,
                 fit_steps: int = 0, fit_learning_rate: float = 1e-2, fit_batch_size: int = 16):
        super().__init__()
        if not 0 < tau < 1:
            raise ValueError(f"tau must lie in (0, 1); got {tau}")
        if feedback_weight < 0:
            raise ValueError(f"feedback_weight must be >= 0; got {feedback_weight}")
        if objective not in ("likelihood", "kd"):
            raise ValueError(f"objective must be 'likelihood' or 'kd'; got {objective!r}")
        if scores not in self.SCORES:
            raise ValueError(f"scores must be one of {self.SCORES}; got {scores!r}")
        if feedback_target not in ("uniform", "data"):
            raise ValueError(f"feedback_target must be 'uniform' or 'data'; got {feedback_target!r}")
        if feedback_window < 1:
            raise ValueError(f"feedback_window must be >= 1; got {feedback_window}")
        if fit_steps < 0 or fit_learning_rate <= 0 or fit_batch_size < 1:
            raise ValueError("fit_steps must be >= 0, fit_learning_rate > 0 and fit_batch_size >= 1")
        if fit_steps and objective != "likelihood":
            raise ValueError("fit_steps needs objective 'likelihood': the 'kd' objective depends on the student, "
                             "so the selector cannot be fitted before it")
        K = int(num_sources)
        self.fit_steps, self.fit_learning_rate, self.fit_batch_size = int(fit_steps), float(fit_learning_rate), \
            int(fit_batch_size)
        self.seed = int(seed)
        self.num_sources, self.tau, self.feedback_weight = K, float(tau), float(feedback_weight)
        self.objective, self.scores = objective, scores
        self.feedback_target, self.feedback_window = feedback_target, int(feedback_window)
        self.hidden = None if hidden is None else [int(h) for h in hidden]
        self.num_inputs = K if scores == "sequence" else 2 * K
        self.inputs = RunningStandardizer(K)
        self.token_inputs = RunningStandardizer(K)
        self.register_buffer("balance_target", torch.full((K,), 1.0 / K, dtype=torch.float64))
        self.register_buffer("running_importance", torch.full((K,), self.feedback_window / K, dtype=torch.float64))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.selector = build_selector(K, self.hidden, num_inputs=self.num_inputs)

    @property
    def kd_trains_weights(self) -> bool:  # type: ignore[override]
        return self.objective == "kd"

    def prepare(self, examples):
        """Fit the input standardisation on the training documents' scores and, with
        feedback_target="data", set the balance target to the share of documents each source is
        best on (lowest NLL per byte). With fit_steps, then train the selector alone on its own
        objective over the training documents (`fit_selector`)."""
        if not examples:
            return
        with torch.no_grad():
            nll = torch.from_numpy(np.stack([ex.teacher_nll_per_byte for ex in examples]).astype(np.float64))
            if nll.shape[1] != self.num_sources:
                raise ValueError(f"the selector was built for {self.num_sources} sources; "
                                 f"the examples have {nll.shape[1]}")
            self.inputs.fit(-nll)
            if self.feedback_target == "data":
                best = oracle_routing(nll)
                share = torch.bincount(best, minlength=self.num_sources).to(torch.float64) / len(examples)
                self.set_balance_target(share)
        if self.fit_steps:
            self.fit_selector(examples)

    def fit_selector(self, examples: Sequence["FusionExample"]) -> list[float]:
        """Train the selector alone for `fit_steps` Adam steps (learning rate `fit_learning_rate`)
        on its likelihood objective plus the feedback term, over random batches of the training
        documents (drawn from `seed`). The likelihood objective does not involve the student, so
        this reaches, before the student's first step, the routing that joint training moves
        toward only as fast as the student's schedule allows. Returns the loss per step."""
        params = [p for p in self.selector.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.fit_learning_rate)
        rng = np.random.default_rng([self.seed, 7919])
        losses = []
        was_training = self.training
        self.train()
        try:
            for _ in range(self.fit_steps):
                pick = rng.choice(len(examples), size=min(self.fit_batch_size, len(examples)), replace=False)
                batch = collate([examples[i] for i in pick], pad_id=0)
                batch.pop("lengths")
                w, g = self.select(batch)
                loss = sum(self.aux_losses(batch, w, g).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            self.train(was_training)
        return losses

    def _balance(self, imp: torch.Tensor) -> torch.Tensor:
        """The importance balance of the running window (about feedback_window sequences, this
        batch included), with the gradient of that window loss passed to this batch's gate: its
        value is K sum_k (s_k - pi_k)^2 over the window's shares s, its gradient with respect to
        this batch's importance is 2K (s_k - pi_k) / (the batch's total importance). A router that
        already follows pi gets neither loss nor gradient; a source below its share is pushed up."""
        keep = max(0.0, 1.0 - float(imp.detach().sum()) / self.feedback_window)
        window = self.running_importance.to(imp.dtype) * keep + imp.detach()
        share = window / window.sum().clamp_min(1e-10)
        target = self.balance_target.to(imp.dtype)
        K = imp.shape[0]
        value = K * ((share - target) ** 2).sum()
        lin = 2 * K * ((share - target) * imp).sum() / imp.detach().sum().clamp_min(1e-10)
        if self.training:
            with torch.no_grad():
                self.running_importance.copy_(window.to(torch.float64))
        return value + (lin - lin.detach())

    @torch.no_grad()
    def set_balance_target(self, share: torch.Tensor) -> None:
        share = torch.as_tensor(share, dtype=torch.float64)
        if share.shape != (self.num_sources,) or bool((share < 0).any()) or float(share.sum()) <= 0:
            raise ValueError(f"balance target must be {self.num_sources} non-negative shares; got {share.tolist()}")
        share = share / share.sum()
        self.balance_target.copy_(share)
        self.running_importance.copy_(share * self.feedback_window)

    def _gate(self, batch) -> nn.Module:
        return self.selector

    def selector_inputs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x: [B,K] per sequence, or [B,L,2K] per position (the sequence score beside a per-token one)."""
        nll = sequence_scores(batch)
        if nll.shape[1] != self.num_sources:
            raise ValueError(f"the selector was built for {self.num_sources} sources; the batch has {nll.shape[1]}")
        x = self.inputs(-nll, torch.isfinite(nll))                                  # [B,K]
        if self.scores == "sequence":
            return x
        if self.scores == "confidence":
            tok = teacher_confidence(batch)                                          # [B,K,L]
        else:  # oracle_token: looks at the label
            tok = torch.log(teacher_label_probs(batch).clamp_min(1e-12))
        valid = batch["teacher_aligned"] & (batch["labels"] != IGNORE_INDEX)[:, None, :]
        z = self.token_inputs(tok.transpose(1, 2), valid.transpose(1, 2))           # [B,L,K]
        return torch.cat([x.unsqueeze(1).expand_as(z), z], dim=-1)                  # [B,L,2K]

    def gate(self, x: torch.Tensor, selector: nn.Module) -> torch.Tensor:
        """g = softmax(MLP(x)) over the sources: [B,K] for x [B,K], [B,K,L] for x [B,L,2K]."""
        param = next(selector.parameters())
        g = torch.softmax(selector(x.to(param.dtype)), dim=-1)
        return g.transpose(1, 2) if x.ndim == 3 else g

    def threshold(self, g: torch.Tensor) -> torch.Tensor:
        """w from g: the sources above tau (the best one if none passes), renormalised."""
        keep = g > self.tau
        best = F.one_hot(g.argmax(dim=1), g.shape[1]).movedim(-1, 1).bool()
        keep = torch.where(keep.any(dim=1, keepdim=True), keep, best)
        w = g * keep
        return w / (w.sum(dim=1, keepdim=True) + self.EPS)

    def select(self, batch):
        g = self.gate(self.selector_inputs(batch), self._gate(batch))
        return self.threshold(g), g

    def source_weights(self, batch):
        return self.select(batch)[0]

    def aux_losses(self, batch, weights, gate=None):
        out: dict[str, torch.Tensor] = {}
        labelled = (batch["labels"] != IGNORE_INDEX)
        if self.feedback_weight > 0:
            g = (weights if gate is None else gate).float()
            if g.ndim == 3:   # per position: each sequence's mean gate over its labelled positions
                m = labelled[:, None, :].to(g.dtype)
                g = (g * m).sum(-1) / m.sum(-1).clamp_min(1)
            imp = g.sum(0)                                                           # [K], over sequences
            out["feedback"] = self.feedback_weight * self._balance(imp)
        if self.objective == "likelihood":
            q = teacher_label_probs(batch)                                           # [B,K,L]
            w = weights.float()
            ww = w.unsqueeze(-1) if w.ndim == 2 else w
            fused = (ww * q).sum(1)                                                  # [B,L]
            nll = -torch.log(fused + self.EPS)
            exact = labelled & batch["teacher_exact"].all(dim=1)                     # every source exact
            out["selector_nll"] = torch.where(exact, nll, torch.zeros_like(nll)).sum() / exact.sum().clamp_min(1)
        return out


@register_strategy
class ReferenceStrategy(AdaptiveStrategy):
    """The public reference code's behaviour, kept only to measure against: the selection MLP is
    created afresh, randomly initialised, at every loss computation, so it is never trained
    (its feedback term is computed and logged but reaches no parameter). Its stream of random
    gates is seeded from training.seed and restarts with a resumed run."""

    name = "reference"
    FIXED = {"objective": "kd", "scores": "sequence", "fit_steps": 0}

    def __init__(self, num_sources: int, **kwargs):
        super().__init__(num_sources, **kwargs)
        del self.selector  # no persistent parameters
        self._generator = torch.Generator().manual_seed(int(kwargs.get("seed", 0)))

    def _gate(self, batch) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._generator)))
            return build_selector(self.num_sources, self.hidden, num_inputs=self.num_inputs).to(
                batch["nll_per_byte"].device)


def selection_counts(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per source over the sequences of a batch, from per-sequence weights [B,K]: ([K] sequences
    that select it, [K] the sum of its weights). A sequence selects a source when the source's
    weight is above zero (the adaptive threshold zeroes the others; min_ce and single select
    one; avg_ce all)."""
    w = weights.detach().to(torch.float64)
    if w.ndim != 2 or w.shape[1] == 0:
        return w.new_zeros((0,)), w.new_zeros((0,))
    return (w > 0).sum(0).to(torch.float64), w.sum(0)


def sequence_weights(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence weights [B,K]: per-position weights [B,K,L] averaged over each sequence's
    labelled positions; per-sequence weights as they are."""
    w = weights.detach()
    if w.ndim == 3:
        m = (labels != IGNORE_INDEX)[:, None, :].to(w.dtype)
        w = (w * m).sum(-1) / m.sum(-1).clamp_min(1)
    return w


@torch.no_grad()
def routing_report(strategy: FusionStrategy, examples: Sequence["FusionExample"], source_names: Sequence[str],
                   *, batch_size: int = 16, pad_id: int = 0) -> dict[str, float]:
    """How a strategy routes the documents, per domain and overall ("all"), in eval mode:
    `routing.accuracy.<domain>` (share of documents whose highest-weight source is the per-document
    oracle, the lowest NLL per byte), `routing.weight.<source>.<domain>` (mean weight) and
    `routing.select.<source>.<domain>` (share of documents giving it a weight above zero), and
    `routing.exact_positions` (share of labelled positions where every source is exactly aligned,
    those the likelihood objective is computed on). Empty for a strategy without teachers."""
    if not strategy.uses_teachers or not examples or examples[0].num_sources == 0:
        return {}
    was_training = strategy.training
    strategy.eval()
    try:
        acc: dict[str, list[float]] = {}
        wsum: dict[str, np.ndarray] = {}
        ssum: dict[str, np.ndarray] = {}
        exact = labelled = 0
        for lo in range(0, len(examples), batch_size):
            chunk = list(examples[lo:lo + batch_size])
            batch = collate(chunk, pad_id)
            batch.pop("lengths")
            if next(strategy.parameters(), None) is not None:
                dev = next(strategy.parameters()).device
                batch = {k: v.to(dev) for k, v in batch.items()}
            w = sequence_weights(strategy.select(batch)[0], batch["labels"]).float().cpu()
            oracle = oracle_routing(batch["nll_per_byte"].cpu())
            lab = batch["labels"] != IGNORE_INDEX
            exact += int((lab & batch["teacher_exact"].all(dim=1)).sum())
            labelled += int(lab.sum())
            for i, ex in enumerate(chunk):
                for d in (ex.domain, "all"):
                    acc.setdefault(d, []).append(float(int(w[i].argmax()) == int(oracle[i])))
                    wsum[d] = wsum.get(d, 0) + w[i].numpy().astype(np.float64)
                    ssum[d] = ssum.get(d, 0) + (w[i].numpy() > 0).astype(np.float64)
        out: dict[str, float] = {"routing.exact_positions": exact / max(labelled, 1)}
        for d, hits in acc.items():
            out[f"routing.accuracy.{d}"] = float(np.mean(hits))
            for k, name in enumerate(source_names):
                out[f"routing.weight.{name}.{d}"] = float(wsum[d][k] / len(hits))
                out[f"routing.select.{name}.{d}"] = float(ssum[d][k] / len(hits))
        return out
    finally:
        strategy.train(was_training)


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
                     labels: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused teacher distribution P as entries: ids [B,L,K*k+K] and probabilities w_k Q_k[j]
    (+ w_k on the label for a source without signal at the position), 0 at unlabelled positions."""
    B, K, L, k = teacher_ids.shape
    cd = torch.promote_types(weights.dtype, torch.float32)
    valid, has, q = _teacher_q(teacher_logprobs, cd)              # [B,K,L,k], [B,K,L], [B,K,L,k]
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
                   weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the fused sparse teacher distribution.

    student_logits [B,L,V]; teacher_ids / teacher_logprobs [B,K,L,k]; weights [B,K] per
    sequence or [B,K,L] per position (summing to 1 over K); labels [B,L] with -100 where there
    is no target. Returns the mean over labelled positions of -sum_v P[v] log softmax(z)_v,
    P = sum_k w_k softmax(logprobs_k) on the union of the stored ids (the stored log-probabilities
    already carry the teachers' temperature). Computed in fp32 without materialising P or any
    other [B,L,V] tensor but the gradient.
    """
    ids, probs = _teacher_entries(teacher_ids, teacher_logprobs, weights, labels, student_logits.shape[-1])
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
                clm_weight: float) -> dict[str, torch.Tensor]:
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
    weights, gate = strategy.select(batch)
    kd_weights = weights if strategy.kd_trains_weights else weights.detach()
    t_ids, t_probs = _teacher_entries(batch["teacher_ids"], batch["teacher_logprobs"], kd_weights, labels,
                                      student_logits.shape[-1])
    lam = float(clm_weight)
    ids = torch.cat([label_ids, t_ids], dim=-1)
    probs = torch.cat([label_probs * lam, t_probs * (1.0 - lam)], dim=-1) / n
    loss, neg_logp = sparse_cross_entropy(student_logits, ids, probs)
    with torch.no_grad():  # the two parts' values, from the same log-probabilities
        clm = (neg_logp[..., 0] * label_probs[..., 0]).sum() / n
        kd = (neg_logp[..., 1:] * t_probs.detach()).sum() / n
    out: dict[str, torch.Tensor] = {"clm": clm, "kd": kd}
    for name, value in strategy.aux_losses(batch, weights, gate).items():
        out[name] = value
        loss = loss + value
    out.update(loss=loss, weights=sequence_weights(weights, labels))
    return out


class FusionModel(nn.Module):
    """Student + strategy in one module, so DeepSpeed trains and checkpoints both.

    forward(**batch) -> fusion_loss(...) dict.
    """

    BATCH_KEYS = ("input_ids", "attention_mask", "labels", "teacher_ids", "teacher_logprobs",
                  "teacher_aligned", "teacher_exact", "nll_per_byte")

    def __init__(self, student: nn.Module, strategy: FusionStrategy, *, clm_weight: float):
        super().__init__()
        self.student = student
        self.strategy = strategy
        self.clm_weight = float(clm_weight)

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return fusion_loss(out.logits, batch, self.strategy, clm_weight=self.clm_weight)
