"""Knowledge interference on hand-made tables, the promotion rule, and the comparison tables."""
from __future__ import annotations

import math

import pytest

from fusion_core.interference import interference, lower_is_better, primary_scores, reduction
from fusion_core.promotion import decide_promotion
from fusion_core.reporting import best_columns, markdown_table, shared_metrics

ACC = "eval.task_a.acc_norm"  # higher is better
EM = "eval.task_b.exact_match.strict-match"  # higher is better
BPB = "ppl.code.bits_per_byte"  # lower is better

SCORES = {
    "single:x": {ACC: 0.60, EM: 0.20, BPB: 1.50},
    "single:y": {ACC: 0.50, EM: 0.40, BPB: 1.20},
    "clm": {ACC: 0.55, EM: 0.30, BPB: 1.40},
    "avg_ce": {ACC: 0.50, EM: 0.30, BPB: 1.30},  # drops: 0.10, 0.10, 0.10
    "adaptive": {ACC: 0.62, EM: 0.35, BPB: 1.20},  # drops: 0, 0.05, 0
}
REFS = ["clm", "single:x", "single:y"]


def test_interference_on_a_hand_made_table():
    res = interference("avg_ce", SCORES, REFS)
    drops = {t.task: (t.best, t.best_model, round(t.drop, 10)) for t in res.tasks}
    assert drops == {ACC: (0.60, "single:x", 0.10), EM: (0.40, "single:y", 0.10), BPB: (1.20, "single:y", 0.10)}
    # METHOD.md: mean drop / mean best = 0.1 / ((0.6 + 0.4 + 1.2) / 3)
    assert res.value == pytest.approx(0.1 / (2.2 / 3))
    assert res.tasks_hurt == 3
    assert res.mean_relative_drop == pytest.approx((0.1 / 0.6 + 0.1 / 0.4 + 0.1 / 1.2) / 3)

    ada = interference("adaptive", SCORES, REFS)
    assert ada.tasks_hurt == 1 and ada.value == pytest.approx(0.05 / 3 / (2.2 / 3))
    # adaptive avoids half of avg_ce's interference... here 1 - 0.05/0.30
    assert reduction(ada, res) == pytest.approx(1 - 0.05 / 0.30)


def test_interference_edge_cases():
    # A reference is never its own reference: clm is compared with the single-source models only.
    clm = interference("clm", SCORES, REFS)
    assert clm.references == ("single:x", "single:y")
    assert {t.task: t.best_model for t in clm.tasks} == {ACC: "single:x", EM: "single:y", BPB: "single:y"}
    # Tasks without a finite score for the model or any reference are skipped, not counted as 0.
    table = {"m": {ACC: 0.5, EM: math.nan, "eval.only_m.acc": 0.9}, "r": {ACC: 0.6, EM: 0.1}}
    res = interference("m", table, ["r"])
    assert [t.task for t in res.tasks] == [ACC]
    assert set(res.skipped) == {EM, "eval.only_m.acc"}
    # No reference at all: not measured (None), and the metrics say how many tasks and references.
    none = interference("m", table, [])
    assert none.value is None and none.metrics() == {"interference.tasks": 0.0, "interference.references": 0.0}
    # Nothing to reduce: B shows no interference.
    assert reduction(0.1, 0.0) is None and reduction(None, 0.2) is None
    assert reduction(0.1, 0.2) == pytest.approx(0.5)
    metrics = res.metrics()
    assert metrics["interference"] == pytest.approx(0.1 / 0.6)
    assert metrics[f"interference.drop.{ACC}"] == pytest.approx(0.1)
    assert metrics["interference.tasks_hurt"] == 1.0


def test_primary_scores_pick_one_score_per_task():
    metrics = {
        "eval.mc.acc": 0.4, "eval.mc.acc_norm": 0.5, "eval.mc.acc_stderr": 0.01, "eval.mc.n_samples": 60,
        "eval.gen.exact_match.strict-match": 0.2, "eval.gen.exact_match.flexible-extract": 0.3,
        "eval.only_acc.acc": 0.7,
        "ppl.code.bits_per_byte": 1.5, "ppl.code.perplexity": 9.0, "ppl.all.bits_per_byte": 1.6,
        "humaneval.pass_at_1": 0.0, "humaneval.status.timeout": 1.0, "eval.broken.acc": math.nan,
    }
    assert primary_scores(metrics) == {
        "eval.mc.acc_norm": 0.5, "eval.gen.exact_match.strict-match": 0.2, "eval.only_acc.acc": 0.7,
        "humaneval.pass_at_1": 0.0, "ppl.code.bits_per_byte": 1.5}
    assert lower_is_better("ppl.code.bits_per_byte") and lower_is_better("eval.x.perplexity")
    assert not lower_is_better("eval.x.acc_norm") and not lower_is_better("humaneval.pass_at_1")


@pytest.mark.parametrize("candidate, champion, budget, promote, words", [
    ({"ppl.all.bits_per_byte": 1.80, "interference": 0.01}, {"ppl.all.bits_per_byte": 1.90}, 0.05, True,
     "beats champion version 2 on ppl.all.bits_per_byte (lower is better): 1.8 vs 1.9"),
    ({"ppl.all.bits_per_byte": 1.95, "interference": 0.01}, {"ppl.all.bits_per_byte": 1.90}, 0.05, False,
     "does not beat champion version 2"),
    ({"ppl.all.bits_per_byte": 1.80, "interference": 0.09}, {"ppl.all.bits_per_byte": 1.90}, 0.05, False,
     "interference 0.09 exceeds the budget 0.05"),
    ({"ppl.all.bits_per_byte": 1.80}, {"ppl.all.bits_per_byte": 1.90}, 0.05, False, "no measured interference"),
    ({"ppl.all.bits_per_byte": 1.80}, {"ppl.all.bits_per_byte": 1.90}, None, True, "beats"),
    ({"ppl.all.bits_per_byte": 1.80, "interference": 0.0}, None, 0.05, True, "no champion yet"),
    ({"interference": 0.0}, None, 0.05, False, "has no finite ppl.all.bits_per_byte"),
])
def test_promotion_rule(candidate, champion, budget, promote, words):
    d = decide_promotion(candidate, champion, primary_metric="ppl.all.bits_per_byte", interference_budget=budget,
                         candidate_name="version 3", champion_name="champion version 2")
    assert d.promote is promote
    assert words in d.reason


def test_promotion_goal_and_margin():
    acc = "eval.fusion_code_mc.acc_norm"
    better = decide_promotion({acc: 0.52}, {acc: 0.50}, primary_metric=acc)
    assert better.promote and "higher is better" in better.reason
    assert not decide_promotion({acc: 0.52}, {acc: 0.50}, primary_metric=acc, min_delta=0.05).promote
    # An explicit goal overrides the name's direction.
    assert decide_promotion({acc: 0.48}, {acc: 0.50}, primary_metric=acc, goal="minimize").promote
    with pytest.raises(ValueError, match="goal"):
        decide_promotion({acc: 0.5}, None, primary_metric=acc, goal="bigger")


def test_comparison_table_marks_the_best_per_row():
    table = {"v1": {BPB: 1.3, ACC: 0.5, "interference": 0.2}, "v2": {BPB: 1.2, ACC: 0.6, "interference": 0.1},
             "v3": {BPB: 1.2, ACC: 0.4}}
    assert shared_metrics(table, ["v1", "v2", "v3"]) == [ACC, BPB]
    assert best_columns(table, BPB, ["v1", "v2", "v3"]) == {"v2", "v3"}  # ties are all marked
    assert best_columns(table, ACC, ["v1", "v2", "v3"]) == {"v2"}
    assert best_columns(table, "interference", ["v1", "v2", "v3"]) == {"v2"}  # lower interference is better
    assert best_columns({"a": {ACC: 0.0}, "b": {ACC: 0.0}}, ACC, ["a", "b"]) == set()  # all equal: no best
    md = markdown_table(table, ["v1", "v2", "v3"], [BPB, ACC]).splitlines()
    assert md[2] == f"| {BPB} ↓ | 1.3000 | 1.2000 ★ | 1.2000 ★ |"
    assert md[3] == f"| {ACC} ↑ | 0.5000 | 0.6000 ★ | 0.4000 |"
