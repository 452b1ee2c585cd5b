"""Bootstrap over items and seeds: per-item results of one task (`TaskItems`), estimates with
their percentile intervals (`Estimate`), and the paired difference of two models.

A replicate resamples the seeds (training runs) and the items of each task (documents,
questions) with replacement; figures of several models computed from one draw are paired. The
generator is seeded, so every interval is reproducible. Pure: numpy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, eq=False)
class TaskItems:
    """One model's results on one task under one seed, item by item.

    An accuracy task: `values` holds each question's score (0/1 for accuracy, exact match,
    pass@1) and `bytes` is None; the task's score is their mean. A bits-per-byte task: `values`
    holds each document's negative log-likelihood in bits and `bytes` its UTF-8 byte count; the
    task's score is sum(values) / sum(bytes). Raises ValueError for repeated ids, lengths that
    differ, or a document without bytes.
    """

    ids: tuple[str, ...]
    values: tuple[float, ...]
    bytes: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("item ids repeat")
        if len(self.values) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids but {len(self.values)} values")
        if self.bytes is not None:
            object.__setattr__(self, "bytes", tuple(float(b) for b in self.bytes))
            if len(self.bytes) != len(self.ids):
                raise ValueError(f"{len(self.ids)} ids but {len(self.bytes)} byte counts")
            if any(b <= 0 for b in self.bytes):
                raise ValueError("every document needs a positive byte count")

    @property
    def score(self) -> float:
        """Accuracy (mean value) or bits per byte (sum bits / sum bytes); NaN without items."""
        if not self.ids:
            return math.nan
        if self.bytes is None:
            return sum(self.values) / len(self.values)
        return sum(self.values) / sum(self.bytes)

    def arrays(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, bytes) of the items `ids`, in that order."""
        where = {i: k for k, i in enumerate(self.ids)}
        pick = [where[i] for i in ids]
        values = np.asarray(self.values, dtype=float)[pick]
        return values, None if self.bytes is None else np.asarray(self.bytes, dtype=float)[pick]


# `{seed: {task score name: TaskItems}}`: one model's evaluations, a seed label per training seed.
ModelItems = Mapping[Hashable, Mapping[str, TaskItems]]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile bootstrap interval [lo, hi] at `level`; every part
    None when it cannot be computed (nothing to compare, nothing to reduce)."""

    value: float | None
    lo: float | None = None
    hi: float | None = None
    level: float = LEVEL

    @property
    def measured(self) -> bool:
        return self.value is not None

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (False when not measured)."""
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)

    def metrics(self, name: str) -> dict[str, float]:
        """`{name: value, name.lo: lo, name.hi: hi}`, the parts that are finite."""
        parts = {name: self.value, f"{name}.lo": self.lo, f"{name}.hi": self.hi}
        return {k: float(v) for k, v in parts.items() if _finite(v)}

    def text(self, scale: float = 1.0, digits: int = 4, suffix: str = "") -> str:
        """"0.0312 [0.0101, 0.0544]" (values times `scale`), "n/a" when not measured."""
        if self.value is None:
            return "n/a"
        f = lambda v: "n/a" if v is None else f"{v * scale:.{digits}f}"  # noqa: E731
        return f"{f(self.value)}{suffix} [{f(self.lo)}, {f(self.hi)}]"


def interval(replicates: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """The percentile interval: order statistics (no interpolation, so a bound is a value some
    replicate took, and infinite replicates stay meaningful)."""
    replicates = replicates[~np.isnan(replicates)]
    if replicates.size == 0:
        return None, None
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(replicates, [tail, 1.0 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def count_draws(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """(resamples, n) counts: how often each of n things is drawn (n draws with replacement) in
    each replicate."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


@dataclass
class ItemTable:
    """Every (model, seed) result on one task's shared items, as arrays."""

    task: str
    ids: list[str]
    values: dict[str, np.ndarray]  # model -> (seeds, items)
    bytes: np.ndarray | None  # (items,)

    def point(self, model: str) -> float:
        """The mean over seeds of the task's score (own scale)."""
        v = self.values[model]
        per_seed = v.mean(axis=1) if self.bytes is None else v.sum(axis=1) / self.bytes.sum()
        return float(per_seed.mean())

    def replicates(self, model: str, item_counts: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
        """(resamples,) the seed-weighted mean score on the resampled items (own scale)."""
        v = self.values[model]  # (S, n)
        if self.bytes is None:
            per_seed = item_counts @ v.T / v.shape[1]  # (B, S)
        else:
            per_seed = (item_counts @ v.T) / (item_counts @ self.bytes)[:, None]
        return (per_seed * seed_weights).sum(axis=1)


def item_table(task: str, items: Mapping[str, ModelItems], holders: list[str], seeds: tuple) -> ItemTable | None:
    """The arrays of `task` over its shared items, None when no item is shared."""
    first = items[holders[0]][seeds[0]][task]
    shared = set(first.ids)
    for m in holders:
        for s in seeds:
            shared &= set(items[m][s][task].ids)
    ids = [i for i in first.ids if i in shared]
    if not ids:
        return None
    values, doc_bytes = {}, None
    for m in holders:
        rows = []
        for s in seeds:
            v, b = items[m][s][task].arrays(ids)
            if (b is None) != (first.bytes is None):
                raise ValueError(f"task {task}: bytes for some models only")
            if b is not None:
                if doc_bytes is not None and not np.array_equal(b, doc_bytes):
                    raise ValueError(f"task {task}: the same document ids have other byte counts (other texts?)")
                doc_bytes = b
            rows.append(v)
        values[m] = np.vstack(rows)
    return ItemTable(task, ids, values, doc_bytes)


def paired_difference(a: ModelItems | Mapping[Hashable, TaskItems], b: ModelItems | Mapping[Hashable, TaskItems],
                      task: str | None = None, *, resamples: int = RESAMPLES, rng_seed: int = 0,
                      level: float = LEVEL) -> Estimate:
    """score(A) - score(B) on one task, each the mean over seeds of the task's score (accuracy, or
    bits per byte = sum bits / sum bytes), with a paired bootstrap interval: every replicate
    resamples the seeds and the items once, the same for A and B. `a` and `b` are
    `{seed: TaskItems}`, or `{seed: {task: TaskItems}}` with `task` naming the task.
    `.excludes_zero` says whether the difference is significant at `level`.

    Raises ValueError when A and B were evaluated under different seeds, share no item, or one
    has byte counts and the other not; KeyError when a seed lacks `task`.
    """
    pick = (lambda side: {s: v[task] for s, v in side.items()}) if task is not None else dict  # noqa: E731
    items = {"a": pick(a), "b": pick(b)}
    if set(items["a"]) != set(items["b"]):
        raise ValueError(f"A was evaluated under seeds {sorted(items['a'], key=str)}, "
                         f"B under {sorted(items['b'], key=str)}: a paired difference needs the same seeds")
    seeds = tuple(sorted(items["a"], key=str))
    if not seeds:
        raise ValueError("no evaluation to compare")
    name = task or "task"
    table = item_table(name, {k: {s: {name: v[s]} for s in seeds} for k, v in items.items()}, ["a", "b"], seeds)
    if table is None:
        raise ValueError(f"{name}: A and B share no item")
    rng = np.random.default_rng(rng_seed)
    seed_weights = count_draws(rng, resamples, len(seeds)) / len(seeds)
    counts = count_draws(rng, resamples, len(table.ids))
    reps = table.replicates("a", counts, seed_weights) - table.replicates("b", counts, seed_weights)
    return Estimate(table.point("a") - table.point("b"), *interval(reps, level), level)
