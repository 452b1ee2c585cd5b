"""Knowledge interference (docs/method.md) on a hand-worked table of per-item scores, its bootstrap
intervals, the paired difference, the promotion rule, and the comparison tables."""
from __future__ import annotations

import math

import pytest

from fusion_core.bootstrap import Estimate, TaskItems, paired_difference
from fusion_core.eval_items import task_items
from fusion_core.interference import lower_is_better, measure_interference, primary_scores, reduction
from fusion_core.promotion import decide_promotion
from fusion_core.reporting import best_columns, markdown_table, shared_metrics

ACC = "eval.qa.acc"  # higher is better; 4 questions
BPB = "ppl.code.bits_per_byte"  # lower is better; 2 documents of 100 and 300 bytes
QUESTIONS = ("q1", "q2", "q3", "q4")
DOCS, DOC_BYTES = ("d1", "d2"), (100, 300)


def _model(acc_by_seed, bits_by_seed):
    return {seed: {ACC: TaskItems(QUESTIONS, acc), BPB: TaskItems(DOCS, bits, DOC_BYTES)}
            for seed, (acc, bits) in enumerate(zip(acc_by_seed, bits_by_seed))}


# Per item, seed 0 then seed 1. Worked by hand:
#                accuracy: seed 0, seed 1 -> mean      bits per byte: seed 0, seed 1 -> mean
# single:x       0.75, 0.50 -> 0.625 (best)            400/400, 400/400 -> 1.0
# single:y       1.00, 0.00 -> 0.500                   320/400, 320/400 -> 0.8 (best)
# clm            0.50, 0.25 -> 0.375                   480/400, 480/400 -> 1.2
# avg_ce         0.50, 0.50 -> 0.500                   360/400, 360/400 -> 0.9
# adaptive       0.75, 0.50 -> 0.625                   320/400, 336/400 -> 0.82
# single:y is the best reference on seed 0 (1.0) but a noisy one: the seed means pick single:x.
ITEMS = {
    "single:x": _model([(1, 1, 1, 0), (1, 1, 0, 0)], [(100, 300), (100, 300)]),
    "single:y": _model([(1, 1, 1, 1), (0, 0, 0, 0)], [(80, 240), (80, 240)]),
    "clm": _model([(1, 0, 1, 0), (1, 0, 0, 0)], [(120, 360), (120, 360)]),
    "avg_ce": _model([(1, 1, 0, 0), (1, 0, 1, 0)], [(100, 260), (90, 270)]),
    "adaptive": _model([(1, 1, 1, 0), (1, 0, 1, 0)], [(80, 240), (84, 252)]),
}
REFS = ["clm", "single:x", "single:y"]


@pytest.fixture(scope="module")
def study():
    return measure_interference(ITEMS, REFS, resamples=400, rng_seed=7)


def test_best_is_the_best_seed_mean_of_one_reference_set(study):
    avg = study["avg_ce"]
    by_task = {t.task: t for t in avg.tasks}
    # best_j = max over R of the seed mean: single:x (0.625), not single:y's lucky seed 0 (1.0).
    assert (by_task[ACC].best, by_task[ACC].best_model) == (pytest.approx(0.625), "single:x")
    assert (by_task[BPB].best, by_task[BPB].best_model) == (pytest.approx(0.8), "single:y")
    assert by_task[ACC].score == pytest.approx(0.5) and by_task[BPB].score == pytest.approx(0.9)
    assert by_task[ACC].drop.value == pytest.approx(0.125)  # accuracy points, absolute
    assert by_task[BPB].drop.value == pytest.approx(0.1)  # bits per byte
    assert by_task[BPB].relative_drop.value == pytest.approx(0.1 / 0.8)
    # Every model meets the same best_j, whatever its own role.
    for model in ITEMS:
        assert {t.task: (t.best, t.best_model) for t in study[model].tasks} == {
            ACC: (pytest.approx(0.625), "single:x"), BPB: (pytest.approx(0.8), "single:y")}


def test_interference_is_reported_per_unit_never_mixed(study):
    avg, ada = study["avg_ce"], study["adaptive"]
    assert set(avg.units) == {"bpb", "acc"}
    assert avg.units["bpb"].value == pytest.approx(0.125)  # mean relative drop over the bpb tasks: 0.1 / 0.8
    assert avg.units["acc"].value == pytest.approx(0.125)  # mean absolute drop over the accuracy tasks
    assert ada.units["bpb"].value == pytest.approx(0.02 / 0.8)  # 0.82 against 0.8
    assert ada.units["acc"].value == 0.0  # 0.625, level with the best reference
    metrics = avg.metrics()
    assert "interference" not in metrics  # no single ratio over both units
    assert metrics["interference.bpb"] == pytest.approx(0.125) and metrics["interference.acc"] == pytest.approx(0.125)
    assert metrics["interference.bpb.lo"] <= metrics["interference.bpb"] <= metrics["interference.bpb.hi"]
    assert metrics["interference.references"] == 3 and metrics["interference.tasks"] == 2
    assert metrics["interference.bpb.tasks"] == 1 and metrics["interference.acc.tasks"] == 1
    # A model with bits-per-byte tasks only has no accuracy figure at all (not a 0).
    only_bpb = measure_interference({m: {s: {BPB: t[BPB]} for s, t in v.items()} for m, v in ITEMS.items()}, REFS,
                                    resamples=50)
    assert set(only_bpb["avg_ce"].units) == {"bpb"}


def test_a_reference_is_compared_with_the_same_best(study):
    x, y, clm = study["single:x"], study["single:y"], study["clm"]
    drops = lambda i: {t.task: t.drop.value for t in i.tasks}  # noqa: E731
    assert drops(x) == {ACC: 0.0, BPB: pytest.approx(0.2)}  # best on accuracy: no drop there
    assert drops(y) == {ACC: pytest.approx(0.125), BPB: 0.0}  # its seed mean 0.5 against single:x's 0.625
    assert drops(clm) == {ACC: pytest.approx(0.25), BPB: pytest.approx(0.4)}
    assert clm.units["bpb"].value == pytest.approx(0.5)
    # clm's documents cost 1.5 times single:y's bits each, single:x's 1.25 times: every resample
    # gives a relative drop of exactly 0.5, so the interval is [0.5, 0.5] and the task is hurt.
    clm_bpb = next(t for t in clm.tasks if t.task == BPB)
    assert (clm_bpb.relative_drop.lo, clm_bpb.relative_drop.hi) == (pytest.approx(0.5), pytest.approx(0.5))
    assert clm_bpb.hurt and clm.units["bpb"].lo == pytest.approx(0.5)
    # A reference set holding nothing but the model itself says nothing: not measured.
    alone = measure_interference(ITEMS, ["clm"], models=["clm", "avg_ce"], resamples=50)
    assert not alone["clm"].measured and alone["clm"].metrics() == {"interference.references": 1.0,
                                                                    "interference.tasks": 0.0}
    assert alone["avg_ce"].units["bpb"].value == 0.0  # 0.9 beats clm's 1.2


def test_a_model_level_with_the_best_reference_is_not_hurt(study):
    copy = dict(ITEMS, copy_of_x=ITEMS["single:x"])
    res = measure_interference(copy, REFS, resamples=400, rng_seed=7)
    acc = next(t for t in res["copy_of_x"].tasks if t.task == ACC)
    assert acc.drop.value == 0.0 and acc.drop.lo == 0.0 and not acc.hurt
    # adaptive is level on accuracy: the interval includes 0, so not hurt, and it counts as such.
    ada = {t.task: t for t in study["adaptive"].tasks}
    assert ada[ACC].drop.lo == 0.0 and not ada[ACC].hurt
    # avg_ce's documents all cost more bits than single:y's: every resample shows a drop.
    avg = {t.task: t for t in study["avg_ce"].tasks}
    assert avg[BPB].hurt and avg[BPB].drop.lo > 0
    assert study["avg_ce"].tasks_hurt == 1 + avg[ACC].hurt


def test_bootstrap_intervals_are_reproducible_and_contain_the_estimate(study):
    again = measure_interference(ITEMS, REFS, resamples=400, rng_seed=7)
    other = measure_interference(ITEMS, REFS, resamples=400, rng_seed=8)
    for model in ITEMS:
        for unit, est in study[model].units.items():
            assert again[model].units[unit] == est
            assert est.lo <= est.value <= est.hi and est.level == 0.95
        for t in study[model].tasks:
            assert t.drop.lo <= t.drop.value <= t.drop.hi
    # the generator's seed is what fixes them: the same draws again, other draws with another seed
    same, moved = again.replicates[("avg_ce", "bpb")], other.replicates[("avg_ce", "bpb")]
    assert (same == study.replicates[("avg_ce", "bpb")]).all() and not (moved == same).all()
    # The reduction of adaptive against avg_ce: paired, from the same resamples.
    red = study.reduction("adaptive", "avg_ce", "bpb")
    assert red.value == pytest.approx(1 - 0.025 / 0.125)
    assert red.lo <= red.value <= red.hi <= 1.0
    assert study.reduction("adaptive", "avg_ce", "acc").value == 1.0
    assert study.reduction("avg_ce", "adaptive", "acc") == Estimate(None)  # adaptive shows none to reduce
    assert reduction(0.1, 0.0) is None and reduction(None, 0.2) is None and reduction(0.1, 0.2) == pytest.approx(0.5)


def test_seeds_and_items_must_match():
    with pytest.raises(ValueError, match="different seeds"):
        measure_interference({"a": ITEMS["clm"], "b": {0: ITEMS["avg_ce"][0]}}, ["a"])
    # Items are compared on the ids every model shares; a task no reference has is skipped.
    short = {s: {ACC: TaskItems(QUESTIONS[:2], t[ACC].values[:2]), "eval.extra.acc": TaskItems(("e",), (1,))}
             for s, t in ITEMS["avg_ce"].items()}
    res = measure_interference({**ITEMS, "short": short}, REFS, models=["short"], resamples=50)
    (acc,) = res["short"].tasks
    assert acc.items == 2 and res["short"].skipped == ("eval.extra.acc",)
    # best over q1, q2: single:x 1.0 (both seeds), so short's (1+1 + 1+0)/4 = 0.75 drops 0.25
    assert acc.best == 1.0 and acc.drop.value == pytest.approx(0.25)
    with pytest.raises(ValueError, match="byte count"):
        TaskItems(("d",), (1.0,), (0,))


def test_paired_difference():
    avg, ada = ITEMS["avg_ce"], ITEMS["adaptive"]
    bpb = paired_difference(avg, ada, BPB, resamples=300, rng_seed=1)
    assert bpb.value == pytest.approx(0.9 - 0.82)
    # every document of every seed costs avg_ce more bits than adaptive: the interval excludes 0
    assert 0 < bpb.lo <= bpb.value <= bpb.hi and bpb.excludes_zero
    assert paired_difference(avg, ada, BPB, resamples=300, rng_seed=1) == bpb
    acc = paired_difference(avg, ada, ACC, resamples=300, rng_seed=1)
    assert acc.value == pytest.approx(0.5 - 0.625) and acc.lo <= acc.value <= acc.hi
    same = paired_difference(avg, avg, ACC, resamples=50)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0) and not same.excludes_zero
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(avg, {0: avg[0]}, ACC)


def test_task_items_from_evaluation_records():
    records = [
        {"unit": "perplexity", "kind": "document", "id": "d1", "domain": "code", "bits": 100.0, "bytes": 100, "tokens": 9},
        {"unit": "perplexity", "kind": "document", "id": "d2", "domain": "code", "bits": 260.0, "bytes": 300, "tokens": 30},
        {"unit": "lm_eval:qa", "kind": "question", "task": "eval.qa", "id": "0", "scores": {"acc": 1.0, "acc_norm": 0.0}},
        {"unit": "lm_eval:qa", "kind": "question", "task": "eval.qa", "id": "1", "scores": {"acc": 1.0, "acc_norm": 1.0}},
        {"unit": "lm_eval:gen", "kind": "question", "task": "eval.gen", "id": "0",
         "scores": {"exact_match.strict-match": 0.0, "exact_match.flexible-extract": 1.0}},
    ]
    items = task_items(records)
    # the same names and the same primary metric as the flat metrics' primary_scores
    assert set(items) == {"ppl.code.bits_per_byte", "eval.qa.acc_norm", "eval.gen.exact_match.strict-match"}
    assert items["ppl.code.bits_per_byte"].score == pytest.approx(360 / 400)  # sum bits / sum bytes
    assert items["eval.qa.acc_norm"].score == 0.5
    assert set(primary_scores({"eval.qa.acc": 1.0, "eval.qa.acc_norm": 0.5, "ppl.code.bits_per_byte": 0.9,
                               "eval.gen.exact_match.strict-match": 0.0,
                               "eval.gen.exact_match.flexible-extract": 1.0})) == set(items)


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


BPB_I, ACC_I = "interference.bpb", "interference.acc"


@pytest.mark.parametrize("candidate, champion, budget, promote, words", [
    ({"ppl.all.bits_per_byte": 1.80, BPB_I: 0.01, ACC_I: 0.02}, {"ppl.all.bits_per_byte": 1.90}, 0.05, True,
     "beats champion version 2 on ppl.all.bits_per_byte (lower is better): 1.8 vs 1.9"),
    ({"ppl.all.bits_per_byte": 1.95, BPB_I: 0.01}, {"ppl.all.bits_per_byte": 1.90}, 0.05, False,
     "does not beat champion version 2"),
    ({"ppl.all.bits_per_byte": 1.80, BPB_I: 0.09}, {"ppl.all.bits_per_byte": 1.90}, 0.05, False,
     "interference.bpb 0.09 exceeds the budget 0.05"),
    # each unit against the budget: 6 accuracy points lost is over 0.05 whatever the bits per byte
    ({"ppl.all.bits_per_byte": 1.80, BPB_I: 0.0, ACC_I: 0.06}, {"ppl.all.bits_per_byte": 1.90}, 0.05, False,
     "interference.acc 0.06 exceeds the budget 0.05"),
    ({"ppl.all.bits_per_byte": 1.80, "interference": 0.01}, {"ppl.all.bits_per_byte": 1.90}, 0.05, False,
     "no measured interference"),  # the old mixed ratio is not a measurement
    ({"ppl.all.bits_per_byte": 1.80}, {"ppl.all.bits_per_byte": 1.90}, None, True, "beats"),
    ({"ppl.all.bits_per_byte": 1.80, ACC_I: 0.0}, None, 0.05, True, "no champion yet"),
    ({ACC_I: 0.0}, None, 0.05, False, "has no finite ppl.all.bits_per_byte"),
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
    bpb, acc = "ppl.code.bits_per_byte", "eval.task_a.acc_norm"
    table = {"v1": {bpb: 1.3, acc: 0.5, BPB_I: 0.2}, "v2": {bpb: 1.2, acc: 0.6, BPB_I: 0.1},
             "v3": {bpb: 1.2, acc: 0.4}}
    assert shared_metrics(table, ["v1", "v2", "v3"]) == [acc, bpb]
    assert best_columns(table, bpb, ["v1", "v2", "v3"]) == {"v2", "v3"}  # ties are all marked
    assert best_columns(table, acc, ["v1", "v2", "v3"]) == {"v2"}
    assert best_columns(table, BPB_I, ["v1", "v2", "v3"]) == {"v2"}  # lower interference is better
    assert best_columns({"a": {acc: 0.0}, "b": {acc: 0.0}}, acc, ["a", "b"]) == set()  # all equal: no best
    md = markdown_table(table, ["v1", "v2", "v3"], [bpb, acc]).splitlines()
    assert md[2] == f"| {bpb} ↓ | 1.3000 | 1.2000 ★ | 1.2000 ★ |"
    assert md[3] == f"| {acc} ↑ | 0.5000 | 0.6000 ★ | 0.4000 |"
