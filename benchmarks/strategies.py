"""Fusion strategies side by side on one pipeline config (prints a table; not a test).

    .venv/bin/python benchmarks/strategies.py [configs/demo.yaml] [--seeds 0 1 2]
        [--variants adaptive min_ce avg_ce clm reference single:smollm2 adaptive:kd] [--json OUT]

Runs `fusion run CONFIG --set fusion.strategy=... --set fusion.training.seed=S --json` once per
(variant, seed), one after the other: stages 1-3 are shared and reused (computed by the first
run if needed), each run trains and evaluates its own target and registers it as a version of
the config's registered model (`fusion compare CONFIG` lists them all). A run already complete
is reused by the pipeline, so an interrupted sweep goes on where it stopped.

Variants: a strategy name; `single:<source>`; `adaptive:<objective>` (likelihood or kd); any of
them followed by `+key=value` config overrides (`adaptive+fusion.adaptive.learning_rate=0.01`). Prints,
per variant, the mean over seeds (and min-max when there are several) of held-out bits per byte
per domain and overall (lower is better) and of each bundled task's acc_norm / exact match
(higher is better), then the variants ranked by overall held-out bits per byte.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.compare import HEADLINE, short_name  # noqa: E402


def overrides(variant: str, seed: int) -> list[str]:
    head, *extra = variant.split("+")
    name, _, option = head.partition(":")
    out = [f"fusion.strategy={name}", f"fusion.training.seed={seed}", *extra]
    if name == "single":
        if not option:
            raise SystemExit("single needs a source: single:<source name>")
        out.append(f"fusion.single_source={option}")
    elif name == "adaptive" and option:
        out.append(f"fusion.adaptive.objective={option}")
    elif option:
        raise SystemExit(f"variant {variant!r}: only single:<source> and adaptive:<objective> take an option")
    return out


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics `fusion compare` shows by default, under its short names."""
    return {short_name(k): v for k, v in metrics.items()
            if k.startswith(("ppl.", "eval.")) and k.endswith(HEADLINE)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+",
                    default=["adaptive", "adaptive:kd", "min_ce", "avg_ce", "clm", "reference", "single:smollm2"])
    ap.add_argument("--json", type=Path, default=None, help="write every run's summary here (JSON lines)")
    args = ap.parse_args()
    fusion = Path(sys.executable).with_name("fusion")
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            cmd = [str(fusion), "run", str(args.config), "--json"]
            for o in overrides(variant, seed):
                cmd += ["--set", o]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{variant} seed {seed}: FAILED ({proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            summary = json.loads(proc.stdout[proc.stdout.index("{"):])
            stages = summary["stages"]
            print(f"{variant} seed {seed}: {time.perf_counter() - t0:.0f} s; version {summary['version']}; "
                  f"computed: {', '.join(n for n, s in stages.items() if not s['reused']) or 'nothing'}", flush=True)
            results.setdefault(variant, []).append(headline(summary["metrics"]))
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({"variant": variant, "seed": seed, "summary": summary}) + "\n")
    if not results:
        raise SystemExit("no run succeeded")
    columns = sorted({k for runs in results.values() for r in runs for k in r},
                     key=lambda k: (not k.endswith("bpb"), k))
    print(f"\n{'variant':16} {'seeds':>5} " + " ".join(f"{c:>22}" for c in columns))
    for variant, runs in results.items():
        cells = []
        for c in columns:
            vals = [r[c] for r in runs if c in r]
            if not vals:
                cells.append(f"{'-':>22}")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:22.4f}")
            else:
                cells.append(f"{statistics.mean(vals):.4f} ({min(vals):.3f}-{max(vals):.3f})".rjust(22))
        print(f"{variant:16} {len(runs):5d} " + " ".join(cells))
    ranked = sorted(results, key=lambda v: statistics.mean(r.get("all bpb", float("inf")) for r in results[v]))
    print("\nheld-out bits per byte, all domains, best first: "
          + ", ".join(f"{v} {statistics.mean(r['all bpb'] for r in results[v]):.4f}" for v in ranked
                      if all("all bpb" in r for r in results[v])))


if __name__ == "__main__":
    main()
