"""fusion_core.training: schedule, data order, and real DeepSpeed runs of a tiny Llama on the CPU.

The DeepSpeed tests take a few seconds each once DeepSpeed's shm_comm op is built; the very
first run on a machine builds it (~1-2 min) into TORCH_EXTENSIONS_DIR.
"""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusion_core.config import FusionConfig, TrainingConfig
from fusion_core.fusion import AdaptiveStrategy, FusionExample, collate
from fusion_core.training import (
    DataOrder, deepspeed_config, lr_factor, micro_batch_position, resolve_precision, train_target,
)
from test_fusion import random_example  # noqa: E402  (tests/ is on sys.path under pytest)


def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, total_steps=10, warmup_steps=3, min_lr_ratio=0.1) for s in range(10)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[3] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert lr_factor(0, total_steps=1, warmup_steps=0, min_lr_ratio=0.5) == pytest.approx(1.0)


def test_data_order_is_seeded_epochs_of_permutations():
    order = DataOrder(5, seed=3)
    stream = order.indices(0, 15)
    for e in range(3):
        assert sorted(stream[5 * e: 5 * e + 5]) == list(range(5))
    assert stream == DataOrder(5, seed=3).indices(0, 15)
    assert stream != DataOrder(5, seed=4).indices(0, 15)
    assert order.indices(7, 4) == stream[7:11]
    # ranks and accumulation micro-batches tile the stream without overlap
    pos = sorted(micro_batch_position(s, m, rank=r, world_size=2, micro_batch_size=3, gradient_accumulation=2)
                 for s in range(3) for m in range(2) for r in range(2))
    assert pos == list(range(0, 3 * 2 * 2 * 3, 3))


def test_deepspeed_config_blocks():
    t = TrainingConfig(zero_stage=2, micro_batch_size=3, gradient_accumulation=2, gradient_clipping=0.5)
    cfg = deepspeed_config(t, precision="fp32")
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 2}
    assert "bf16" not in cfg and "optimizer" not in cfg and "scheduler" not in cfg
    assert deepspeed_config(t, precision="bf16")["bf16"] == {"enabled": True}
    off = deepspeed_config(TrainingConfig(zero_stage=3, offload_optimizer=True), precision="fp32")
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="offload_optimizer"):
        deepspeed_config(TrainingConfig(zero_stage=0, offload_optimizer=True), precision="fp32")
    assert resolve_precision("fp32") == "fp32"
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "fp32"
        # bf16 without a GPU that has it is refused before training, naming the field.
        with pytest.raises(ValueError, match=r"fusion.training.precision 'bf16' needs a CUDA GPU"):
            resolve_precision("bf16")
    elif torch.cuda.is_bf16_supported():
        assert resolve_precision("bf16") == resolve_precision("auto") == "bf16"


# ---------------------------------------------------------------- DeepSpeed runs

def make_examples(model_path, texts, K=2, seed=0):
    from transformers import AutoTokenizer

    from fusion_core.tokenization import encode_document

    tok = AutoTokenizer.from_pretrained(model_path)
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        ids = encode_document(tok, text).ids
        if K == 0:
            out.append(FusionExample.without_teachers(ids, "d"))
            continue
        ex = random_example(rng, len(ids), K, 4, len(tok))
        out.append(FusionExample(ids, "d", ex.teacher_ids, ex.teacher_logprobs, ex.teacher_aligned,
                                 ex.teacher_nll_per_byte))
    return out


def fusion_cfg(strategy="avg_ce", **training):
    base = dict(steps=6, micro_batch_size=4, learning_rate=1e-2, warmup_steps=1, zero_stage=2,
                checkpoint_every=100, log_every=1, threads=1)
    base.update(training)
    return FusionConfig(strategy=strategy, clm_weight=0.5, training=TrainingConfig(**base))


def batch_loss(model_dir, examples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    b = collate(examples, pad_id=0)
    with torch.no_grad():
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss.item()


def test_zero2_training_reduces_loss_and_writes_hf_folder(tiny_models, tiny_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models["byte_level"]
    examples = make_examples(src, tiny_corpus[:4])          # one micro-batch of 4: the same batch every step
    logged = []
    res = train_target(src, examples, fusion=fusion_cfg(), out_dir=tmp_path / "run", source_names=["s1", "s2"],
                       log=lambda m, s: logged.append((s, m)))
    assert res.steps == 6 and [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert res.tokens_seen == 6 * sum(len(e) for e in examples)
    losses = [m["loss"] for _, m in logged]
    assert losses[-1] < losses[0] - 0.1
    m = logged[0][1]
    assert {"loss", "clm", "kd", "lr", "tokens_per_s", "select.s1", "select.s2", "weight.s1", "weight.s2"} <= set(m)
    assert m["select.s1"] == m["select.s2"] == 1.0            # avg_ce fuses every source into every sequence
    assert m["weight.s1"] + m["weight.s2"] == pytest.approx(1.0)
    assert logged[-1][1]["lr"] == pytest.approx(1e-2 * 0.1)             # cosine down to min_lr_ratio
    assert res.metrics == logged[-1][1]
    # a normal HF folder: safetensors weights + the target's tokenizer
    assert res.model_dir == tmp_path / "run" / "model"
    assert (res.model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    assert len(AutoTokenizer.from_pretrained(res.model_dir)) == len(AutoTokenizer.from_pretrained(src))
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(src).config.vocab_size
    assert batch_loss(res.model_dir, examples) < batch_loss(src, examples) - 0.1


@pytest.mark.parametrize("strategy", ["min_ce", "adaptive"])
def test_resume_after_interruption_equals_uninterrupted_run(tiny_models, tiny_corpus, tmp_path, strategy):
    src = tiny_models["metaspace"]
    examples = make_examples(src, tiny_corpus[:5], K=2, seed=1)   # 5 examples: epochs wrap inside a step
    cfg = fusion_cfg(strategy, steps=4, micro_batch_size=2, gradient_accumulation=2, checkpoint_every=2)
    full = train_target(src, examples, fusion=cfg, out_dir=tmp_path / "full", source_names=["a", "b"])
    assert full.resumed_from_step is None

    class Killed(RuntimeError):
        pass

    def kill_at_3(metrics, step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_target(src, examples, fusion=cfg, out_dir=tmp_path / "killed", source_names=["a", "b"], log=kill_at_3)
    assert not (tmp_path / "killed" / "model").exists()
    steps_logged = []
    resumed = train_target(src, examples, fusion=cfg, out_dir=tmp_path / "killed", source_names=["a", "b"],
                           log=lambda m, s: steps_logged.append(s))
    assert resumed.resumed_from_step == 2 and resumed.steps == 4 and steps_logged == [3, 4]
    assert resumed.tokens_seen == full.tokens_seen
    a = load_file(full.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert resumed.metrics["loss"] == pytest.approx(full.metrics["loss"], abs=1e-6)
    if strategy == "adaptive":  # the trained selector is saved with the model and resumes with it
        sa = load_file(full.model_dir / "fusion_strategy.safetensors")
        sb = load_file(resumed.model_dir / "fusion_strategy.safetensors")
        init = AdaptiveStrategy(2, seed=cfg.training.seed).state_dict()
        assert sorted(sa) == sorted(sb) == sorted(init) and "selector.0.weight" in sa
        assert max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa) < 1e-6
        assert sa["inputs.fitted"].item() and sa["inputs.count"].min() == len(examples)  # fitted on the data
        assert max((sa[k] - init[k]).abs().max().item() for k in sa if k.startswith("selector.")) > 1e-4  # trained

    # A finished run resumes at its end and only re-exports the model.
    again = train_target(src, examples, fusion=cfg, out_dir=tmp_path / "killed", source_names=["a", "b"])
    assert again.resumed_from_step == 4 and again.steps == 4
    c = load_file(again.model_dir / "model.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-6
    # Different batching cannot silently continue from these checkpoints.
    other = fusion_cfg(strategy, steps=4, micro_batch_size=1, gradient_accumulation=2, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"other data, batching or strategy \(saved, now\): "
                                         r"\{'micro_batch_size': \(2, 1\)\}"):
        train_target(src, examples, fusion=other, out_dir=tmp_path / "killed", source_names=["a", "b"])
    # Nor can another strategy.
    switched = fusion_cfg("avg_ce" if strategy == "adaptive" else "adaptive", steps=4, micro_batch_size=2,
                          gradient_accumulation=2, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"other data, batching or strategy .*'strategy': \('" + strategy):
        train_target(src, examples, fusion=switched, out_dir=tmp_path / "killed", source_names=["a", "b"])


def test_zero3_clm_without_teachers_gathers_weights(tiny_models, tiny_corpus, tmp_path):
    src = tiny_models["wordpiece"]
    examples = make_examples(src, tiny_corpus[:6], K=0)
    res = train_target(src, examples, fusion=fusion_cfg("clm", steps=3, micro_batch_size=3, zero_stage=3),
                       out_dir=tmp_path / "z3", source_names=["a", "b"])
    assert "kd" not in res.metrics and not any(k.startswith("select.") for k in res.metrics)
    before = load_file(src / "model.safetensors")
    after = load_file(res.model_dir / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(after[k].shape == before[k].shape for k in before)                 # gathered, not partitions
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
    assert math.isfinite(batch_loss(res.model_dir, examples))


def test_inconsistent_inputs_are_rejected(tiny_models, tiny_corpus, tmp_path):
    src = tiny_models["byte_level"]
    examples = make_examples(src, tiny_corpus[:2], K=2)
    with pytest.raises(ValueError, match="2 sources but 3 source names"):
        train_target(src, examples, fusion=fusion_cfg(), out_dir=tmp_path, source_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="no training examples"):
        train_target(src, [], fusion=fusion_cfg(), out_dir=tmp_path, source_names=["a", "b"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_models, tiny_corpus, tmp_path, monkeypatch):
    from fusion_core.fusion import AvgCEStrategy
    from fusion_core.training import TrainingDiverged

    src = tiny_models["byte_level"]
    examples = make_examples(src, tiny_corpus[:4])
    real = AvgCEStrategy.source_weights
    calls = []

    def nan_from_the_third_step(self, batch):
        calls.append(1)
        w = real(self, batch)
        return w * float("nan") if len(calls) >= 3 else w

    monkeypatch.setattr(AvgCEStrategy, "source_weights", nan_from_the_third_step)
    with pytest.raises(TrainingDiverged, match=r"step 3 \(micro-batch 1\): the loss is not finite \(.*kd nan.*\); "
                                               r"training stopped before applying it; the last good checkpoint, "
                                               r"step 2, is kept in .*checkpoints"):
        train_target(src, examples, fusion=fusion_cfg(steps=4, checkpoint_every=2), out_dir=tmp_path / "run",
                     source_names=["s1", "s2"])
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step2" and not (tmp_path / "run" / "model").exists()
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step2"]


def test_selector_learning_rate_is_a_group_of_its_own():
    from fusion_core.fusion import FusionModel
    from fusion_core.training import _make_optimizer

    model = FusionModel(torch.nn.Linear(3, 3), AdaptiveStrategy(3), clm_weight=0.5)
    training = TrainingConfig(learning_rate=1e-3, weight_decay=0.1)
    groups = _make_optimizer(model, training, selector_lr=1e-2).param_groups
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [
        (1, 1e-3, 0.1), (1, 1e-3, 0.0), (6, 1e-2, 0.0)]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model.strategy.parameters()}
    # Without it the selector trains with the student's learning rate and weight decay.
    groups = _make_optimizer(model, training).param_groups
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups] == [(4, 1e-3, 0.1), (4, 1e-3, 0.0)]


def test_reinit_target_draws_weights_from_the_seed(tiny_models):
    """A seed varies the target's initialisation when asked: the same seed gives the same weights,
    another seed other ones, and tied embeddings stay tied."""
    from transformers import AutoModelForCausalLM

    from fusion_core.training import reinitialize

    src = tiny_models["metaspace"]
    loaded = AutoModelForCausalLM.from_pretrained(src)
    a, b, c = (AutoModelForCausalLM.from_pretrained(src) for _ in range(3))
    reinitialize(a, 1)
    reinitialize(b, 1)
    reinitialize(c, 2)
    sa, sb, sc, s0 = a.state_dict(), b.state_dict(), c.state_dict(), loaded.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    changed = [k for k in sa if k.endswith("proj.weight") or "embed" in k]
    assert changed and all(not torch.equal(sa[k], sc[k]) and not torch.equal(sa[k], s0[k]) for k in changed)
    std = a.config.initializer_range
    w = sa[changed[0]]
    assert abs(float(w.std()) - std) < 0.2 * std
    if a.config.tie_word_embeddings:
        assert a.get_output_embeddings().weight.data_ptr() == a.get_input_embeddings().weight.data_ptr()
