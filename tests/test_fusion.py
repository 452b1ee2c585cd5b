import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_core.fusion import (
    IGNORE_INDEX, STRATEGIES, AdaptiveStrategy, FusionExample, FusionModel, ReferenceStrategy, clm_loss, collate,
    fusion_loss, get_strategy, selection_counts, sparse_kd_loss, strategy_from_config,
)


def random_example(rng, n, K, k, V, *, unaligned_frac=0.3, unused_frac=0.2, domain="d"):
    """A FusionExample following the data contract, with random teacher signals."""
    ids = rng.integers(0, V, size=n)
    t_ids = rng.integers(0, V, size=(K, n, k))
    lp = np.log(rng.dirichlet(np.ones(k), size=(K, n))).astype(np.float32)
    lp[rng.random((K, n, k)) < unused_frac] = -np.inf
    lp[..., 0] = np.maximum(lp[..., 0], -5.0)   # at least one valid entry per row
    aligned = rng.random((K, n)) >= unaligned_frac
    label = np.concatenate([ids[1:], ids[-1:]])
    for kk in range(K):
        for t in np.flatnonzero(~aligned[kk]):
            t_ids[kk, t] = 0
            t_ids[kk, t, 0] = label[t]
            lp[kk, t] = -np.inf
            lp[kk, t, 0] = 0.0
    ce = rng.uniform(0.5, 4.0, size=K).astype(np.float32)
    return FusionExample(ids, domain, t_ids, lp, aligned, ce)


def dense_kd(logits, teacher_ids, teacher_logprobs, weights, labels):
    """Reference: materialise P [B,L,V] by looping, then the full cross-entropy."""
    B, L, V = logits.shape
    K = teacher_ids.shape[1]
    P = torch.zeros(B, L, V, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            for kk in range(K):
                lp = teacher_logprobs[b, kk, t].double()
                valid = torch.isfinite(lp)
                if not valid.any():
                    P[b, t, labels[b, t].clamp_min(0)] += weights[b, kk]
                    continue
                q = torch.softmax(lp[valid], dim=0)
                for idx, qq in zip(teacher_ids[b, kk, t][valid].tolist(), q.tolist()):
                    P[b, t, idx] += float(weights[b, kk]) * qq
    logp = torch.log_softmax(logits.double(), dim=-1)
    per = -(P * logp).sum(-1)
    mask = labels != IGNORE_INDEX
    return per[mask].mean()


def test_sparse_kd_equals_dense_reference_values_and_gradients():
    rng = np.random.default_rng(0)
    V, K, k = 13, 3, 5   # tiny vocab: many duplicate ids within and across sources
    exs = [random_example(rng, n, K, k, V) for n in (7, 5, 6)]
    batch = collate(exs, pad_id=1)
    B, L = batch["input_ids"].shape
    torch.manual_seed(0)
    logits = torch.randn(B, L, V, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(B, K, dtype=torch.float64), dim=1)
    got = sparse_kd_loss(logits, batch["teacher_ids"], batch["teacher_logprobs"], w, batch["labels"])
    ref = dense_kd(logits, batch["teacher_ids"], batch["teacher_logprobs"], w, batch["labels"])
    assert abs(got.item() - ref.item()) < 1e-9
    g_got, = torch.autograd.grad(got, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, atol=1e-10)
    # fp32 logits (the training dtype): same to 1e-6
    got32 = sparse_kd_loss(logits.detach().float(), batch["teacher_ids"], batch["teacher_logprobs"], w.float(),
                           batch["labels"])
    ref = dense_kd(logits.detach(), batch["teacher_ids"], batch["teacher_logprobs"], w, batch["labels"])
    assert abs(got32.item() - ref.item()) < 1e-6


def _one_position(ids_rows, lp_rows, w, V=6, label=2):
    """Batch of 1 sequence, 1 labelled position, K = len(ids_rows)."""
    t_ids = torch.tensor(ids_rows, dtype=torch.long)[None, :, None, :]          # [1,K,1,k]
    t_lp = torch.tensor(lp_rows, dtype=torch.float32)[None, :, None, :]
    labels = torch.tensor([[label]])
    logits = torch.randn(1, 1, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = sparse_kd_loss(logits, t_ids, t_lp, torch.tensor([w], dtype=torch.float64), labels)
    return loss, torch.log_softmax(logits[0, 0], -1)


def test_duplicate_ids_add_up_within_and_across_sources():
    # One source listing id 3 twice: Q = (0.5, 0.5) on the same id -> P = one-hot(3).
    loss, logp = _one_position([[3, 3]], [[math.log(0.3), math.log(0.3)]], [1.0])
    assert loss.item() == pytest.approx(-logp[3].item(), abs=1e-9)
    # Two sources: union {1: .5*.25, 3: .5*.75 + .5*1.0}
    loss, logp = _one_position([[1, 3], [3, 0]], [[math.log(0.25), math.log(0.75)], [0.0, -math.inf]], [0.5, 0.5])
    expected = -(0.125 * logp[1] + 0.875 * logp[3])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-9)


def test_renormalisation_over_valid_entries():
    # Stored top-2 of a larger distribution (0.2, 0.2, rest unused) renormalises to (0.5, 0.5).
    loss, logp = _one_position([[4, 5, 0]], [[math.log(0.2), math.log(0.2), -math.inf]], [1.0])
    assert loss.item() == pytest.approx(-(0.5 * logp[4] + 0.5 * logp[5]).item(), abs=1e-9)


def test_unaligned_positions_equal_ce_against_the_label():
    rng = np.random.default_rng(3)
    ex = random_example(rng, 9, 2, 4, 20, unaligned_frac=1.0)   # no source aligned anywhere
    batch = collate([ex], pad_id=0)
    logits = torch.randn(1, 9, 20, dtype=torch.float64)
    w = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    kd = sparse_kd_loss(logits, batch["teacher_ids"], batch["teacher_logprobs"], w, batch["labels"])
    ce = F.cross_entropy(logits[0, :-1], torch.as_tensor(ex.input_ids[1:]))
    assert kd.item() == pytest.approx(ce.item(), abs=1e-9)
    assert clm_loss(logits, batch["labels"]).item() == pytest.approx(ce.item(), abs=1e-9)
    # A row with no valid entry at all (defensive) also counts as the label's one-hot.
    lp = batch["teacher_logprobs"].clone()
    lp[:] = -math.inf
    kd2 = sparse_kd_loss(logits, batch["teacher_ids"], lp, w, batch["labels"])
    assert kd2.item() == pytest.approx(ce.item(), abs=1e-9)


def test_teacher_id_outside_student_vocab_is_an_error():
    with pytest.raises(ValueError, match="student vocabulary"):
        _one_position([[7]], [[0.0]], [1.0], V=6)


def test_collate_shapes_padding_and_labels():
    rng = np.random.default_rng(1)
    exs = [random_example(rng, 5, 2, 3, 30), random_example(rng, 3, 2, 3, 30)]
    # k may differ between examples: padded with unused entries.
    short = exs[1]
    exs[1] = FusionExample(short.input_ids, "x", short.teacher_ids[:, :, :2], short.teacher_logprobs[:, :, :2],
                           short.teacher_aligned, short.teacher_nll_per_byte)
    b = collate(exs, pad_id=99)
    assert b["input_ids"].shape == (2, 5) and b["input_ids"].dtype == torch.long
    assert b["teacher_ids"].shape == (2, 2, 5, 3) and b["teacher_logprobs"].shape == (2, 2, 5, 3)
    assert b["teacher_aligned"].shape == (2, 2, 5) and b["nll_per_byte"].shape == (2, 2)
    assert b["input_ids"][1].tolist() == list(exs[1].input_ids) + [99, 99]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert b["labels"][0].tolist() == list(exs[0].input_ids[1:]) + [-100]
    assert b["labels"][1].tolist() == list(exs[1].input_ids[1:]) + [-100, -100, -100]
    assert torch.isinf(b["teacher_logprobs"][1, :, 3:]).all()
    assert torch.isinf(b["teacher_logprobs"][1, :, :3, 2]).all()            # padded k entry
    assert not b["teacher_aligned"][1, :, 3:].any()
    np.testing.assert_array_equal(b["teacher_ids"][0].numpy(), exs[0].teacher_ids)
    np.testing.assert_array_equal(b["teacher_logprobs"][1, :, :3, :2].numpy(), exs[1].teacher_logprobs)
    np.testing.assert_array_equal(b["nll_per_byte"].numpy(), np.stack([e.teacher_nll_per_byte for e in exs]))
    # K = 0
    b0 = collate([FusionExample.without_teachers(np.arange(4)), FusionExample.without_teachers(np.arange(2))], 0)
    assert b0["teacher_ids"].shape == (2, 0, 4, 1) and b0["nll_per_byte"].shape == (2, 0)
    with pytest.raises(ValueError, match="different numbers of sources"):
        collate([exs[0], FusionExample.without_teachers(np.arange(3))], 0)


def test_example_validates_shapes():
    with pytest.raises(ValueError, match="teacher_aligned"):
        FusionExample(np.arange(4), "d", np.zeros((1, 4, 2)), np.zeros((1, 4, 2)), np.ones((1, 3), bool),
                      np.zeros(1))
    with pytest.raises(ValueError, match="teacher_ids"):
        FusionExample(np.arange(4), "d", np.zeros((1, 5, 2)), np.zeros((1, 5, 2)), np.ones((1, 5), bool),
                      np.zeros(1))


def test_strategies_registry_and_weights():
    assert set(STRATEGIES) == {"adaptive", "min_ce", "avg_ce", "uniform", "single", "clm", "reference"}
    with pytest.raises(ValueError, match="known: .*avg_ce.*min_ce"):
        get_strategy("nope")
    ce = torch.tensor([[2.0, 0.5, 1.0], [0.1, 3.0, float("nan")], [1.0, 1.0, 2.0]])
    batch = {"nll_per_byte": ce}
    w = get_strategy("min_ce").source_weights(batch)
    assert w.tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 0]]          # NaN never wins; ties -> first
    w = get_strategy("avg_ce").source_weights({"nll_per_byte": ce[:1]})
    r = torch.exp(-ce[0])
    expected = torch.exp(r) / torch.exp(r).sum()
    assert torch.allclose(w[0], expected)
    assert torch.allclose(w.sum(1), torch.ones(1))
    assert get_strategy("single", source_index=2).source_weights(batch).tolist() == [[0, 0, 1]] * 3
    assert torch.allclose(get_strategy("uniform").source_weights(batch), torch.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="out of range"):
        get_strategy("single", source_index=3).source_weights(batch)
    chosen, weight = selection_counts(torch.tensor([[0.0, 1.0], [0.9, 0.1], [0.0, 1.0]]))
    assert chosen.tolist() == [1, 3] and weight.tolist() == pytest.approx([0.9, 2.1])


def test_strategy_from_config_resolves_single_source():
    from fusion_core.config import FusionConfig

    s = strategy_from_config(FusionConfig(strategy="single", single_source="b"), ["a", "b"])
    assert s.source_index == 1
    with pytest.raises(ValueError, match="not a source"):
        strategy_from_config(FusionConfig(strategy="single", single_source="z"), ["a", "b"])
    assert strategy_from_config(FusionConfig(strategy="avg_ce"), ["a"]).name == "avg_ce"


def test_fusion_loss_mixes_parts():
    rng = np.random.default_rng(2)
    batch = collate([random_example(rng, 6, 2, 3, 15) for _ in range(2)], pad_id=0)
    logits = torch.randn(2, 6, 15)
    out = fusion_loss(logits, batch, get_strategy("avg_ce"), clm_weight=0.3)
    assert out["loss"].item() == pytest.approx(0.3 * out["clm"].item() + 0.7 * out["kd"].item(), rel=1e-6)
    assert out["weights"].shape == (2, 2)
    clm_out = fusion_loss(logits, batch, get_strategy("clm"), clm_weight=0.3)
    assert "kd" not in clm_out and clm_out["loss"].item() == pytest.approx(out["clm"].item(), rel=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_clm_weight_one_is_hf_causal_lm_loss(tiny_models, padded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion_core.tokenization import encode_document

    path = tiny_models["byte_level"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."]
    exs = []
    for text in texts if padded else texts[:1]:
        ids = encode_document(tok, text).ids
        ex = random_example(rng, len(ids), 2, 4, V)
        exs.append(FusionExample(ids, "d", ex.teacher_ids, ex.teacher_logprobs, ex.teacher_aligned,
                                 ex.teacher_nll_per_byte))
    batch = collate(exs, pad_id=tok.pad_token_id)
    fm = FusionModel(model, get_strategy("min_ce"), clm_weight=1.0)
    with torch.no_grad():
        out = fm(**{k: v for k, v in batch.items() if k != "lengths"})
        hf_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=hf_labels).loss
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert out["clm"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert out["kd"].item() != pytest.approx(ref.item(), abs=1e-3)


def test_sequence_without_labels_contributes_nothing_and_is_finite():
    one = FusionExample.without_teachers(np.array([5]))
    b = collate([one], pad_id=0)
    assert b["labels"].tolist() == [[-100]]
    logits = torch.randn(1, 1, 8, requires_grad=True)
    assert clm_loss(logits, b["labels"]).item() == 0.0
    rng = np.random.default_rng(0)
    b2 = collate([random_example(rng, 1, 2, 3, 8)], pad_id=0)
    out = fusion_loss(logits, b2, get_strategy("min_ce"), clm_weight=0.5)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- the adaptive selector

def _adaptive_batch(seed=3, K=3, n=8, B=4, V=20):
    rng = np.random.default_rng(seed)
    return collate([random_example(rng, n, K, 4, V, unaligned_frac=0.2) for _ in range(B)], pad_id=0)


def test_adaptive_weights_follow_the_threshold_and_sum_to_one():
    batch = _adaptive_batch()
    strat = AdaptiveStrategy(3, tau=0.3, seed=1)
    g = strat.gate(strat.selector_inputs(batch), strat.selector)
    w = strat.source_weights(batch)
    assert w.shape == (4, 3) and torch.allclose(w.sum(1), torch.ones(4), atol=1e-6)
    keep = g > 0.3
    keep[~keep.any(1)] = torch.nn.functional.one_hot(g[~keep.any(1)].argmax(1), 3).bool()
    assert torch.equal(w > 0, keep)  # exactly the sources above tau (the best one when none is)
    assert torch.allclose(w, g * keep / (g * keep).sum(1, keepdim=True), atol=1e-6)
    per_token = AdaptiveStrategy(3, scores="confidence", seed=1).source_weights(batch)
    assert per_token.shape == (4, 3, batch["labels"].shape[1])
    with pytest.raises(ValueError, match=r"tau must lie in \(0, 1\)"):
        AdaptiveStrategy(3, tau=1.0)


def test_the_kd_objective_moves_the_selector_toward_the_source_the_student_agrees_with():
    """The paper's objective trains the selector through L_KD: one step raises the weight of the
    source whose distribution the student already matches, whichever source is better."""
    B, L, V = 4, 5, 6
    labels = torch.randint(0, V, (B, L))
    labels[:, -1] = IGNORE_INDEX
    ids = torch.arange(V).expand(B, 2, L, V).contiguous()
    q0 = torch.full((V,), 0.06).index_fill(0, torch.tensor([4]), 0.7)   # source 0 bets on token 4
    q1 = torch.full((V,), 0.06).index_fill(0, torch.tensor([2]), 0.7)   # source 1 on token 2
    lp = torch.stack([q0.log().expand(B, L, V), q1.log().expand(B, L, V)], 1)
    batch = {"teacher_ids": ids, "teacher_logprobs": lp, "teacher_aligned": torch.ones(B, 2, L, dtype=torch.bool),
             "teacher_exact": torch.ones(B, 2, L, dtype=torch.bool), "labels": labels,
             "nll_per_byte": torch.tensor([[0.5, 1.0]] * B)}      # source 0 is the better one
    student = q1.log().expand(B, L, V).clone()                     # but the student agrees with source 1
    strat = AdaptiveStrategy(2, tau=0.05, objective="kd", feedback_weight=0.0, seed=0)
    before = strat.source_weights(batch)[:, 1].mean().item()
    opt = torch.optim.SGD(strat.parameters(), lr=1.0)
    fusion_loss(student, batch, strat, clm_weight=0.0)["loss"].backward()
    opt.step()
    assert strat.source_weights(batch)[:, 1].mean().item() > before + 1e-3
    # The likelihood objective keeps L_KD from the weights: only its own term trains the selector.
    strat = AdaptiveStrategy(2, tau=0.05, objective="likelihood", feedback_weight=0.0, seed=0)
    out = fusion_loss(student, batch, strat, clm_weight=0.0)
    own = torch.autograd.grad(out["selector_nll"], list(strat.parameters()), retain_graph=True)
    total = torch.autograd.grad(out["loss"], list(strat.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(own, total))


def test_selector_state_round_trips_through_a_state_dict():
    batch = _adaptive_batch()
    trained = AdaptiveStrategy(3, seed=0)
    with torch.no_grad():
        for p_ in trained.parameters():
            p_.add_(torch.randn_like(p_))
    fresh = AdaptiveStrategy(3, seed=7)
    assert not torch.allclose(fresh.source_weights(batch), trained.source_weights(batch))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.source_weights(batch), trained.source_weights(batch))


def test_reference_strategy_draws_a_fresh_random_gate_every_call():
    batch = _adaptive_batch()
    ref = ReferenceStrategy(3, tau=0.05, seed=0)
    assert list(ref.parameters()) == []          # nothing to train, nothing to save
    assert not torch.allclose(ref.source_weights(batch), ref.source_weights(batch))


def test_sparse_cross_entropy_gradients_match_finite_differences():
    from fusion_core.fusion import sparse_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3, 4))
    ids[0, 0, 1] = ids[0, 0, 0]                        # a duplicate entry
    probs = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, p: sparse_cross_entropy(z, ids, p)[0], (logits, probs))
    total, neg_logp = sparse_cross_entropy(logits, ids, probs)
    want = -torch.log_softmax(logits, -1).gather(-1, ids)
    assert torch.allclose(neg_logp, want) and torch.allclose(total, (probs * want).sum())
