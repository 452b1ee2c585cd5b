"""When a registered candidate may become the champion: the rule, apart from the registry.

A candidate is promoted when
  1. it has the primary metric, finite;
  2. its knowledge interference is measured and, in each unit measured (bits per byte: mean
     relative drop; accuracy: mean drop in accuracy), within the budget (when a budget is set);
  3. it beats the current champion on the primary metric (strictly, by more than `min_delta`),
     or there is no champion yet.
The decision always says why, in words a user can act on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from fusion_core.interference import lower_is_better

# Knowledge interference per unit (fusion_core.interference): never one number mixing the two.
INTERFERENCE_METRICS = ("interference.bpb", "interference.acc")


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def decide_promotion(candidate: Mapping[str, float], champion: Mapping[str, float] | None, *, primary_metric: str,
                     goal: str = "auto", interference_budget: float | None = None, min_delta: float = 0.0,
                     candidate_name: str = "candidate", champion_name: str = "champion") -> PromotionDecision:
    """Whether `candidate` (its metrics) should replace `champion` (its metrics, None: no champion).

    `goal` is "minimize", "maximize" or "auto" (from the metric's name, see
    interference.lower_is_better). `interference_budget` caps each of the candidate's
    interference metrics it has (`interference.bpb`, a relative drop: 0.05 = 5 % more bits per
    byte; `interference.acc`, an accuracy drop: 0.05 = 5 accuracy points), point estimates;
    None: no cap.
    """
    if goal not in ("auto", "minimize", "maximize"):
        raise ValueError(f"goal must be auto, minimize or maximize, got {goal!r}")
    minimize = lower_is_better(primary_metric) if goal == "auto" else goal == "minimize"
    value = candidate.get(primary_metric)
    if value is None or not math.isfinite(value):
        return PromotionDecision(False, f"{candidate_name} has no finite {primary_metric} (primary metric); "
                                        f"was it evaluated with this task?")
    within = ""
    if interference_budget is not None:
        measured = {m: v for m in INTERFERENCE_METRICS if (v := candidate.get(m)) is not None and math.isfinite(v)}
        if not measured:
            return PromotionDecision(False, f"{candidate_name} has no measured interference, and the budget is "
                                            f"{_fmt(interference_budget)}: its reference models (clm, each single "
                                            f"source) were not evaluated (fusion reproduce, or "
                                            f"evaluation.train_references: true)")
        over = [f"{m} {_fmt(v)}" for m, v in measured.items() if v > interference_budget]
        if over:
            return PromotionDecision(False, f"{candidate_name}'s interference {', '.join(over)} exceeds the budget "
                                            f"{_fmt(interference_budget)}")
        within = (", interference " + ", ".join(f"{m} {_fmt(v)}" for m, v in measured.items())
                  + f" within the budget {_fmt(interference_budget)}")
    direction = "lower" if minimize else "higher"
    if champion is None:
        return PromotionDecision(True, f"no champion yet; {candidate_name} has {primary_metric} "
                                       f"{_fmt(value)}{within}")
    best = champion.get(primary_metric)
    if best is None or not math.isfinite(best):
        return PromotionDecision(True, f"{champion_name} has no finite {primary_metric}; {candidate_name} has "
                                       f"{_fmt(value)}{within}")
    gain = (best - value) if minimize else (value - best)
    if gain > min_delta:
        return PromotionDecision(True, f"{candidate_name} beats {champion_name} on {primary_metric} ({direction} is "
                                       f"better): {_fmt(value)} vs {_fmt(best)}{within}")
    return PromotionDecision(False, f"{candidate_name} does not beat {champion_name} on {primary_metric} ({direction} "
                                    f"is better): {_fmt(value)} vs {_fmt(best)}"
                                    + (f", needs a margin above {_fmt(min_delta)}" if min_delta else ""))
