"""Recipes for the demo's own models: two domain specialists and a weak target, built reproducibly.

A recipe turns (seed, options) into a local Hugging Face folder (tokenizer, config.json,
model.safetensors) that AutoTokenizer / AutoModelForCausalLM load directly:

- "code_specialist": byte-level BPE tokenizer + a tiny Llama trained on generated Python.
- "arithmetic_specialist": WordPiece tokenizer + a tiny Llama trained on arithmetic worksheets.
- "demo_target": Metaspace (SentencePiece-style) BPE tokenizer trained on all three domains +
  a randomly initialised small Llama, weak on every domain by design.

All training text comes from `demo_corpus.specialist_training_texts`, which never yields a
document of the demo corpus, so the fusion corpus is held out for every model built here.

Builds are deterministic for (name, seed, options) on one machine and thread count (the step
budget is fixed; a `max_seconds` option exists as a safety stop and is recorded when it fires),
atomic (written to `<out_dir>.partial-*` and renamed) and idempotent (a complete folder with
the same fingerprint is returned untouched).

Measured with `bits_per_byte_table` on write_demo_corpus(seed=0), 2 idle CPU cores, fp32
(bits per UTF-8 byte; each document scored whole after its start token):

    model                  prose   code   arithmetic   build
    SmolLM2-135M-Instruct  1.045   0.526  1.093        (package)
    code_specialist        10.45   0.292  8.83         59 s, 0.55M params
    arithmetic_specialist  11.24   11.05  0.688        93 s, 0.66M params
    demo_target (random)   4.11    2.65   3.87         3 s, 2.9M params

Seeds 1 and 2: code 0.296; arithmetic 0.686, 0.722. The WordPiece specialist does not pay for
the whitespace and case its tokenizer drops, which flatters its arithmetic number a little.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from fusion_core.demo_corpus import CORPUS_VERSION, DOMAINS, specialist_training_texts

# Bump when a change to this module changes what a recipe builds (corpus changes bump
# demo_corpus.CORPUS_VERSION, which the fingerprint also holds).
RECIPE_CODE_VERSION = "1"
RECIPE_FILE = "fusion_recipe.json"  # written last inside the folder; its presence marks completeness


@dataclass(frozen=True)
class Recipe:
    """A named way to build a model folder; `defaults` lists every option it accepts."""

    name: str
    description: str
    defaults: dict[str, Any]
    build: Callable[[Path, int, dict[str, Any]], dict[str, Any]] = field(repr=False)

    def resolve(self, options: dict | None) -> dict[str, Any]:
        """Defaults overridden by `options`. Raises ValueError for an option the recipe lacks."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"recipe {self.name!r} has no option(s) {unknown}; known: {sorted(self.defaults)}")
        return {**self.defaults, **options}


# ----------------------------------------------------------------------------------------------
# building blocks


def _train_tokenizer(family: str, texts: list[str], vocab_size: int, *, digit_pieces: bool = False):
    """A tokenizer of `family` for `texts`, reproducible run to run.

    digit_pieces: no multi-digit token in the vocabulary, so numbers are read digit by digit
    (as SmolLM2 and Llama read them). Only the vocabulary changes; the tokenizer is the
    family's usual one (fusion_core.model_zoo).
    """
    from fusion_core.model_zoo import train_tokenizer

    if family == "wordpiece":
        return _wordpiece(texts, vocab_size, digit_pieces=digit_pieces)
    if digit_pieces:
        texts = [_DIGIT_RUN.sub(r"\1 ", t) for t in texts]
    return train_tokenizer(family, texts, vocab_size=vocab_size)


def _wordpiece(texts: list[str], vocab_size: int, *, digit_pieces: bool):
    """A WordPiece tokenizer whose vocabulary is chosen here, deterministically.

    (The `tokenizers` WordPiece trainer breaks ties in a different order on every run, so two
    builds of one recipe would differ.) The vocabulary: every printable ASCII character, as a
    word start and (letters, digits) as a `##` continuation, so that no ASCII text maps to
    [UNK] (which would make out-of-domain text look cheap); then the most frequent whole words
    of `texts`, ties broken alphabetically, up to vocab_size.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    from fusion_core.model_zoo import wordpiece_tokenizer

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    printable = sorted({chr(c) for c in range(33, 127)} - {chr(c) for c in range(ord("A"), ord("Z") + 1)})
    seen = sorted({c for word in counts for c in word} - set(printable))
    starts = printable + seen
    continuations = ["##" + c for c in sorted({c for c in printable if c.isalnum()} | {c for w in counts for c in w[1:]})]
    base = starts + continuations
    words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
             if n >= 2 and len(w) > 1 and not (digit_pieces and any(c.isdigit() for c in w))]
    room = max(0, vocab_size - 4 - len(base))  # 4 special tokens come first
    return wordpiece_tokenizer(base + words[:room])


_DIGIT_RUN = re.compile(r"(\d)(?=\d)")


def _prefix(texts: list[str], n_chars: int) -> list[str]:
    """The first documents of `texts` that add up to about n_chars (at least one)."""
    out, total = [], 0
    for t in texts:
        if out and total >= n_chars:
            break
        out.append(t)
        total += len(t)
    return out


def _encode_stream(tokenizer, texts: Iterable[str]):
    """One long int64 tensor: <bos> doc <eos> <bos> doc <eos> ..."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.append(bos)
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _train_llama(model, stream, *, seed: int, steps: int, batch_size: int, seq_len: int, lr: float,
                 warmup: int, weight_decay: float, max_seconds: float | None) -> dict[str, Any]:
    """Plain AdamW, cosine schedule, fixed data order from `seed`; returns a training log."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_windows = stream.numel() - seq_len - 1
    if n_windows <= 0:
        raise ValueError(f"training stream of {stream.numel()} tokens is shorter than seq_len {seq_len}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    start, losses, done = time.perf_counter(), [], 0
    offsets = torch.arange(seq_len + 1)
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
        starts = torch.randint(0, n_windows, (batch_size,), generator=gen)
        batch = stream[starts[:, None] + offsets]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
    model.eval()
    return {
        "steps_planned": steps, "steps_done": done, "stopped_by_time": done < steps,
        "train_seconds": round(time.perf_counter() - start, 2),
        "tokens_seen": done * batch_size * seq_len, "stream_tokens": int(stream.numel()),
        "loss_first": losses[0] if losses else None,
        "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        # mean loss over each tenth of the run, to see whether the step budget was enough
        "loss_curve": [round(sum(c) / len(c), 4) for c in _tenths(losses)],
    }


def _tenths(values: list[float]) -> list[list[float]]:
    n = len(values)
    return [values[i * n // 10:(i + 1) * n // 10] for i in range(10) if (i + 1) * n // 10 > i * n // 10]


class _Threads:
    """Set torch's intra-op thread count for the build, and restore the caller's afterwards."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


def _build_specialist(domain: str, family: str) -> Callable[[Path, int, dict[str, Any]], dict[str, Any]]:
    def build(out: Path, seed: int, o: dict[str, Any]) -> dict[str, Any]:
        import torch

        from fusion_core.model_zoo import make_llama

        with _Threads(o["threads"]):
            t0 = time.perf_counter()
            texts = specialist_training_texts(domain, seed=seed, n_chars=o["train_chars"])
            tok = _train_tokenizer(family, _prefix(texts, o["tokenizer_chars"]), o["vocab_size"],
                                   digit_pieces=o["digit_pieces"])
            stream = _encode_stream(tok, texts)
            t1 = time.perf_counter()
            model = make_llama(tok, hidden=o["hidden"], layers=o["layers"], heads=o["heads"],
                               intermediate=o["intermediate"], max_positions=o["max_positions"], seed=seed)
            torch.manual_seed(seed)
            log = _train_llama(model, stream, seed=seed, steps=o["steps"], batch_size=o["batch_size"],
                               seq_len=o["seq_len"], lr=o["lr"], warmup=o["warmup"],
                               weight_decay=o["weight_decay"], max_seconds=o["max_seconds"])
            model.save_pretrained(str(out))
            tok.save_pretrained(str(out))
            return {"domain": domain, "tokenizer_family": family, "train_docs": len(texts),
                    "train_chars": sum(map(len, texts)), "data_seconds": round(t1 - t0, 2),
                    "parameters": sum(p.numel() for p in model.parameters()), **log}

    return build


def _build_target(out: Path, seed: int, o: dict[str, Any]) -> dict[str, Any]:
    from fusion_core.model_zoo import make_llama

    with _Threads(o["threads"]):
        texts = [t for d in DOMAINS for t in specialist_training_texts(d, seed=seed, n_chars=o["tokenizer_chars"])]
        tok = _train_tokenizer("metaspace", texts, o["vocab_size"])
        model = make_llama(tok, hidden=o["hidden"], layers=o["layers"], heads=o["heads"],
                           intermediate=o["intermediate"], max_positions=o["max_positions"], seed=seed,
                           out_dir=out)
        return {"tokenizer_family": "metaspace", "tokenizer_docs": len(texts),
                "parameters": sum(p.numel() for p in model.parameters())}


# Sized so that each specialist builds in ~40-100 s on 2 idle CPU cores (fp32) and beats
# SmolLM2-135M clearly on its own domain (see the module docstring of demo_corpus). Every key
# is an option a caller may override; tests use tiny values.
_SPECIALIST_DEFAULTS: dict[str, Any] = {
    "train_chars": 2_000_000,      # training text generated for the run (never demo documents)
    "tokenizer_chars": 1_000_000,  # the first this-many characters of it train the tokenizer
    "vocab_size": 2048, "digit_pieces": False,
    # seq_len covers the longest in-domain demo document (~460 tokens), so no position is
    # scored at a distance the model never saw in training (RoPE does not extrapolate);
    # max_positions says the same in config.json.
    "hidden": 128, "layers": 2, "heads": 4, "intermediate": 384, "max_positions": 512,
    "steps": 200, "batch_size": 8, "seq_len": 512, "lr": 3e-3, "warmup": 20, "weight_decay": 0.1,
    "threads": 2,
    "max_seconds": None,  # a safety stop; when it fires the build is no longer deterministic
}
_CODE_DEFAULTS = dict(_SPECIALIST_DEFAULTS)
# Arithmetic: numbers read digit by digit (a vocabulary of whole numbers leaves a tiny model
# unable to learn sums), one more layer and more steps (its loss is still falling at 200), and a
# lower learning rate (at 3e-3 one seed in two stalled: 0.76 bits/byte against 0.67-0.72).
_ARITHMETIC_DEFAULTS = dict(_SPECIALIST_DEFAULTS, train_chars=3_000_000, vocab_size=512, digit_pieces=True,
                            layers=3, steps=300, lr=2e-3)
_TARGET_DEFAULTS: dict[str, Any] = {
    "tokenizer_chars": 300_000,  # per domain
    "vocab_size": 6000, "hidden": 192, "layers": 4, "heads": 4, "intermediate": 512, "max_positions": 1024,
    "threads": 2,
}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("code_specialist", "byte-level BPE + tiny Llama trained on generated Python",
               _CODE_DEFAULTS, _build_specialist("code", "byte_level")),
        Recipe("arithmetic_specialist", "WordPiece (digit pieces) + tiny Llama trained on arithmetic worksheets",
               _ARITHMETIC_DEFAULTS, _build_specialist("arithmetic", "wordpiece")),
        Recipe("demo_target", "Metaspace BPE on all three domains + random-init small Llama (no training)",
               _TARGET_DEFAULTS, _build_target),
    ]
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`. Raises ValueError listing the known names."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
    return RECIPES[name]


def recipe_fingerprint(name: str, seed: int, options: dict | None = None) -> str:
    """Hex digest of (recipe code version, corpus version, name, seed, resolved options): a build's cache key."""
    resolved = get_recipe(name).resolve(options)
    key = json.dumps({"code_version": RECIPE_CODE_VERSION, "corpus_version": CORPUS_VERSION, "recipe": name,
                      "seed": int(seed), "options": resolved}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def read_build_record(out_dir: Path) -> dict[str, Any] | None:
    """The build record of a complete recipe folder, or None when the folder is absent or incomplete."""
    out_dir = Path(out_dir)
    if not all((out_dir / name).is_file() for name in _REQUIRED_FILES):
        return None
    try:
        return json.loads((out_dir / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_recipe(name: str, out_dir: Path, *, seed: int = 0, options: dict | None = None) -> Path:
    """Build recipe `name` into `out_dir` (a local HF model folder) and return out_dir.

    If out_dir already holds a complete build with the same fingerprint, returns at once. A
    folder from another fingerprint (or without a build record) is replaced. Raises ValueError
    for an unknown recipe or option.
    """
    recipe = get_recipe(name)
    resolved = recipe.resolve(options)
    fingerprint = recipe_fingerprint(name, seed, options)
    out_dir = Path(out_dir)
    record = read_build_record(out_dir)
    if record is not None and record.get("fingerprint") == fingerprint:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        start = time.perf_counter()
        info = recipe.build(tmp, int(seed), resolved)
        record = {"recipe": name, "seed": int(seed), "options": resolved, "fingerprint": fingerprint,
                  "code_version": RECIPE_CODE_VERSION, "build_seconds": round(time.perf_counter() - start, 2),
                  **info}
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        if out_dir.exists():
            done = read_build_record(out_dir)
            if done is not None and done.get("fingerprint") == fingerprint:
                return out_dir  # a concurrent build finished first; ours is discarded below
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------------
# measuring


def measure_bits_per_byte(model_dir: Path, texts: Iterable[str], *, threads: int | None = None) -> float:
    """Bits per UTF-8 byte of `texts` under the model in `model_dir` (each text scored whole).

    Every text is encoded as <start token> + tokens (fusion_core.tokenization) and every token
    is predicted; the sum of its negative log-likelihood (nats) / ln 2 / total bytes. Note that a
    lossy tokenizer (WordPiece drops whitespace and case) does not pay for what it drops.
    """
    import torch

    from fusion_core.models import load_causal_lm, load_tokenizer
    from fusion_core.tokenization import encode_document

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype="float32", device="cpu")
    nll, n_bytes = 0.0, 0
    with _Threads(threads), torch.inference_mode():
        for text in texts:
            ids = torch.as_tensor(encode_document(tok, text).ids)[None]
            logits = model(input_ids=ids).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            n_bytes += len(text.encode("utf-8"))
    return nll / math.log(2) / max(1, n_bytes)


def bits_per_byte_table(model_dirs: dict[str, Path], *, seed: int = 0, scale: float = 1.0,
                        threads: int | None = 2) -> dict[str, dict[str, float]]:
    """{model name: {domain: bits/byte}} on the demo corpus of (seed, scale): who knows what."""
    from fusion_core.demo_corpus import demo_documents

    docs = {d: demo_documents(d, seed=seed, scale=scale) for d in DOMAINS}
    return {name: {d: measure_bits_per_byte(path, docs[d], threads=threads) for d in DOMAINS}
            for name, path in model_dirs.items()}
