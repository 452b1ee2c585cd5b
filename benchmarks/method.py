"""What each correction of the method's definitions changes, on a pipeline's teacher data (prints
figures; not a test). No training: it reads the prepared documents and the teacher shards.

    .venv/bin/python benchmarks/method.py [CONFIG]        (default configs/demo.yaml; run the
                                                          pipeline's stages 1-3 first)

Prints, per domain of the training documents:

1. Scores: how many documents per-token CE (mean CE in each source's own tokens, FuseLLM's
   comparison) sends to another source than NLL per byte does, and to which.
2. The selector's inputs: the spread between sources of r = exp(-CE per token) (the paper's
   input) and of the standardised -NLL per byte (ours), per document: the median over documents
   of max_k - min_k.
3. The feedback loss at perfect routing (every document to its lowest-NLL-per-byte source):
   the squared coefficient of variation per micro-batch of B documents (the earlier definition:
   (K-1)/B expected from batch composition alone) against the running-window balance toward
   the data's mix (ours), over the same stream of micro-batches.
4. The selector's likelihood objective: the share of labelled positions where every source is
   exactly aligned, and, per domain, which source a one-hot selector would prefer when the
   objective is summed over all positions (where an unaligned source scores Q[label] = 1) and
   over exactly aligned positions only.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _stage(root: Path, name: str) -> Path:
    found = sorted((root / "stages" / name).glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no completed {name} stage under {root}: run the pipeline first (fusion run CONFIG)")
    return found[-1].parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch size for the feedback figures")
    ap.add_argument("--batches", type=int, default=400)
    args = ap.parse_args()

    from fusion_core.config import load_config
    from fusion_core.fusion import AdaptiveStrategy, collate, oracle_routing, teacher_label_probs
    from fusion_core.teacher import load_fusion_examples, read_shards

    cfg = load_config(Path(args.config))
    root = cfg.workspace.root
    data, teacher = _stage(root, "prepare_data"), _stage(root, "teacher_inference")
    names = [s.name for s in cfg.sources]
    from tasks.resolve_models import resolve_model

    target = resolve_model(cfg.target.model, cfg.target.name, "target", cfg).path
    examples = load_fusion_examples(data / "train.jsonl", target, [teacher / n for n in names])
    shards = [read_shards(teacher / n) for n in names]
    from fusion_core.data import read_documents

    docs = read_documents(data / "train.jsonl")
    K = len(names)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}; "
          f"{len(examples)} training documents, sources {names}")
    domains = sorted({d.domain for d in docs})

    # 1. per token vs per byte
    print("\n1. Scores: documents whose best source differs, per-token CE against NLL per byte")
    for d in domains:
        ids = [doc.id for doc in docs if doc.domain == d]
        ce = np.array([[s[i].seq_ce for s in shards] for i in ids])
        nb = np.array([[s[i].nll_per_byte for s in shards] for i in ids])
        by_tok, by_byte = ce.argmin(1), np.nan_to_num(nb, nan=np.inf).argmin(1)
        moved = by_tok != by_byte
        where = ", ".join(f"{names[k]} {int((by_tok[moved] == k).sum())}" for k in range(K) if (by_tok[moved] == k).any())
        best = ", ".join(f"{names[k]} {int((by_byte == k).sum())}" for k in range(K))
        print(f"   {d:<11} {int(moved.sum()):>3} of {len(ids)} differ (per token they go to: {where or '-'}); "
              f"per byte the best is {best}")

    # 2. selector inputs
    print("\n2. Selector inputs: median over documents of the spread max_k - min_k")
    nb_all = np.stack([ex.teacher_nll_per_byte for ex in examples]).astype(np.float64)
    ce_all = np.array([[s[doc.id].seq_ce for s in shards] for doc in docs])
    strat = AdaptiveStrategy(K)
    strat.prepare(examples)
    x = ((-nb_all - strat.inputs.mean.numpy()) / strat.inputs.std.numpy())
    for d in domains:
        m = np.array([doc.domain == d for doc in docs])
        r = np.exp(-ce_all[m])
        print(f"   {d:<11} r = exp(-CE): {np.median(r.max(1) - r.min(1)):.4f}   standardised -NLL/byte: "
              f"{np.median(x[m].max(1) - x[m].min(1)):.3f}")

    # 3. feedback at perfect routing
    rng = np.random.default_rng(0)
    best = oracle_routing(torch.from_numpy(nb_all))
    share = torch.bincount(best, minlength=K).double() / len(examples)
    old, new = [], []
    fb = AdaptiveStrategy(K, feedback_weight=1.0)
    fb.prepare(examples)
    for _ in range(args.batches):
        pick = torch.from_numpy(rng.choice(len(examples), args.batch, replace=False))
        g = torch.nn.functional.one_hot(best[pick], K).double()
        imp = g.sum(0)
        old.append(float(imp.var(correction=0) / (imp.mean() ** 2 + 1e-10)))
        new.append(float(fb._balance(imp)))
    print(f"\n3. Feedback loss at perfect routing (data mix {', '.join(f'{n} {s:.2f}' for n, s in zip(names, share))}), "
          f"B = {args.batch}, {args.batches} micro-batches:")
    print(f"   per micro-batch CV^2 (earlier): mean {np.mean(old):.3f} ((K-1)/B = {(K - 1) / args.batch:.3f})")
    print(f"   running window toward the data's mix (now): mean {np.mean(new[50:]):.4f} after 50 micro-batches")

    # 4. the likelihood objective's positions
    print("\n4. Selector likelihood: exactly aligned positions, and the source a one-hot selector prefers")
    for d in domains:
        exs = [ex for ex in examples if ex.domain == d]
        tot_all = np.zeros(K)
        tot_exact = np.zeros(K)
        n_lab = n_exact = 0
        for lo in range(0, len(exs), 16):
            b = collate(exs[lo:lo + 16], 0)
            q = teacher_label_probs(b).double()                                  # [B,K,L]
            lab = b["labels"] != -100
            exact = lab & b["teacher_exact"].all(dim=1)
            nll = -torch.log(q + 1e-8)
            tot_all += (nll * lab[:, None]).sum((0, 2)).numpy()
            tot_exact += (nll * exact[:, None]).sum((0, 2)).numpy()
            n_lab += int(lab.sum())
            n_exact += int(exact.sum())
        print(f"   {d:<11} exact positions {n_exact / max(n_lab, 1):.1%}; preferred over all positions: "
              f"{names[int(tot_all.argmin())]} (NLL {', '.join(f'{v / n_lab:.2f}' for v in tot_all)}); over exact "
              f"positions: {names[int(tot_exact.argmin())]} ({', '.join(f'{v / max(n_exact, 1):.2f}' for v in tot_exact)})")


if __name__ == "__main__":
    main()
