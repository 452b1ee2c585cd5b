"""`fusion reproduce`: the strategy sweep of one config, then the comparison with interference.

Runs the pipeline once per (variant, seed) as a subflow (clm, each single source, min_ce,
avg_ce, adaptive, reference by default). Stages 1-3 are shared: the first run computes them,
the others reuse them. References come first, so every fused model's evaluation finds its
references. Every pipeline's MLflow run is nested under one `reproduce` run, which holds the
comparison: per variant the mean (and spread over seeds) of every headline metric, its
knowledge interference against the best reference, recomputed here per seed with all
references present, and the interference reduction of adaptive against avg_ce and min_ce.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from prefect import flow

from fusion_core.config import PipelineConfig, load_config
from fusion_core.errors import FusionError
from fusion_core.interference import interference, primary_scores, reduction

REFERENCE_VARIANTS = ("clm",)  # and single:<source> for each source
FUSED_VARIANTS = ("min_ce", "avg_ce", "adaptive", "reference")


def default_variants(cfg: PipelineConfig) -> list[str]:
    return ["clm", *[f"single:{s.name}" for s in cfg.sources], *FUSED_VARIANTS]


def variant_overrides(variant: str, seed: int) -> list[str]:
    """`--set` overrides for a variant: a strategy, `single:<source>`, `adaptive:<objective>`,
    then optional `+dotted.key=value` config overrides. Raises FusionError when malformed."""
    head, *extra = variant.split("+")
    name, _, option = head.partition(":")
    out = [f"fusion.strategy={name}", f"fusion.training.seed={seed}", *extra]
    if name == "single":
        if not option:
            raise FusionError(f"variant {variant!r}: single needs a source, single:<source name>")
        out.append(f"fusion.single_source={option}")
    elif name == "adaptive" and option:
        out.append(f"fusion.adaptive.objective={option}")
    elif option:
        raise FusionError(f"variant {variant!r}: only single:<source> and adaptive:<objective> take an option")
    return out


def is_reference(variant: str) -> bool:
    return variant.split("+")[0] == "clm" or variant.startswith("single:") and "+" not in variant


def plan(config_path: Path, variants: list[str], seeds: list[int], overrides: list[str]) -> list[tuple[str, int, Path]]:
    """(variant, seed, resolved config file) for every run, references first; every config is
    validated before anything runs."""
    from flows.pipeline import write_resolved_config

    ordered = sorted(variants, key=lambda v: not is_reference(v))
    runs = []
    for seed in seeds:
        for variant in ordered:
            cfg = load_config(config_path, overrides=[*overrides, *variant_overrides(variant, seed)])
            runs.append((variant, seed, write_resolved_config(cfg)))
    return runs


def summarise(results: list[dict], references: list[str]) -> dict:
    """Per variant: mean, min and max over seeds of each score and of interference; the
    reductions of adaptive against avg_ce and min_ce. `results`: {variant, seed, metrics}."""
    by_seed: dict[int, dict[str, dict[str, float]]] = {}
    for r in results:
        by_seed.setdefault(r["seed"], {})[r["variant"]] = primary_scores(r["metrics"])
    per_run: dict[tuple[str, int], dict[str, float]] = {}
    for r in results:
        scores = by_seed[r["seed"]]
        refs = [v for v in references if v in scores]
        inter = interference(r["variant"], scores, refs)
        extra = {k: v for k, v in inter.metrics().items() if not k.startswith("interference.relative_drop")}
        per_run[(r["variant"], r["seed"])] = {**scores[r["variant"]], "ppl.all.bits_per_byte":
                                              r["metrics"].get("ppl.all.bits_per_byte", math.nan), **extra}
    variants = list(dict.fromkeys(r["variant"] for r in results))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for v in variants:
        runs = [m for (var, _), m in per_run.items() if var == v]
        names = sorted({k for m in runs for k in m})
        table[v] = {}
        for k in names:
            vals = [m[k] for m in runs if k in m and math.isfinite(m[k])]
            if vals:
                table[v][k] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    red = {}
    if "adaptive" in variants:
        for other in ("avg_ce", "min_ce"):
            if other not in variants:
                continue
            pooled = reduction(table["adaptive"].get("interference", {}).get("mean"),
                               table[other].get("interference", {}).get("mean"))
            seeds = [s for s in by_seed if ("adaptive", s) in per_run and (other, s) in per_run]
            each = [reduction(per_run[("adaptive", s)].get("interference"), per_run[(other, s)].get("interference"))
                    for s in seeds]
            red[f"adaptive vs {other}"] = {"of_means": pooled, "per_seed": dict(zip(seeds, each))}
    return {"variants": variants, "table": table, "reductions": red,
            "runs": {f"{v} seed {s}": m for (v, s), m in per_run.items()}}


def render_markdown(summary: dict, results: list[dict], *, title: str, seconds: float, chart: str | None) -> str:
    from fusion_core.reporting import BEST_MARK, best_columns, better_low, fmt

    variants = summary["variants"]
    table = summary["table"]
    metrics = sorted({k for v in variants for k in table[v]},
                     key=lambda m: (m.startswith("interference"), not m.startswith("ppl."), m))
    metrics = [m for m in metrics if m not in ("interference.references", "interference.tasks")]
    metrics = [m for m in metrics if not m.startswith("interference.drop.")] + \
              [m for m in metrics if m.startswith("interference.drop.")]
    means = {v: {k: s["mean"] for k, s in table[v].items()} for v in variants}
    seeds = sorted({r["seed"] for r in results})
    lines = [f"# {title}", "",
             f"{len(results)} pipeline runs ({len(variants)} variants x seeds {seeds}) in {seconds / 60:.1f} min. "
             f"Mean over seeds" + (" (min-max)" if len(seeds) > 1 else "") + f"; {BEST_MARK} best per row "
             "(↓ lower is better). Interference: METHOD.md, against the best of clm and the single-source "
             "models of the same seed.", "",
             "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for m in metrics:
        best = best_columns(means, m, variants)
        cells = []
        for v in variants:
            s = table[v].get(m)
            if s is None:
                cells.append("-")
                continue
            cell = fmt(s["mean"]) + (f" ({fmt(s['min'], 3)}-{fmt(s['max'], 3)})" if s["n"] > 1 else "")
            cells.append(cell + (f" {BEST_MARK}" if v in best else ""))
        lines.append(f"| {m} {'↓' if better_low(m) else '↑'} | " + " | ".join(cells) + " |")
    lines += ["", "## Interference reduction of adaptive", ""]
    if summary["reductions"]:
        lines += ["| against | of the means | per seed |", "|---|---|---|"]
        for name, r in summary["reductions"].items():
            per_seed = ", ".join(f"seed {s}: " + ("n/a" if x is None else f"{x:.1%}") for s, x in r["per_seed"].items())
            lines.append(f"| {name.split(' vs ')[1]} | " + ("n/a" if r["of_means"] is None else f"{r['of_means']:.1%}")
                         + f" | {per_seed} |")
        if any(r["of_means"] is None or None in r["per_seed"].values() for r in summary["reductions"].values()):
            lines += ["", "n/a: the other strategy shows no interference to reduce (or it was not measured)."]
    else:
        lines.append("Not computed: the sweep needs adaptive and avg_ce or min_ce.")
    lines += ["", "## Runs", "", "| variant | seed | registered version | seconds | computed stages |",
              "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['version']} | {r['seconds']:.0f} | "
                     f"{', '.join(r['computed']) or 'none (all reused)'} |")
    if chart:
        lines += ["", f"![chart]({chart})"]
    return "\n".join(lines) + "\n"


@flow(name="fusion_reproduce", log_prints=True)
def fusion_reproduce(config_path: str, seeds: list[int] | None = None, variants: list[str] | None = None,
                     overrides: list[str] | None = None) -> dict:
    """Run the sweep for the config at `config_path`; returns the comparison (and where its report is)."""
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import fusion_pipeline
    from fusion_core.reporting import bar_chart
    from tasks.common import run_logger
    from tasks.tracking import ensure_experiment, tracking_uri

    start = time.perf_counter()
    logger = run_logger()
    path = Path(config_path)
    cfg = load_config(path, overrides=overrides or ())
    seeds = list(seeds) if seeds else [cfg.fusion.training.seed]
    variants = list(dict.fromkeys(variants or default_variants(cfg)))
    runs = plan(path, variants, seeds, list(overrides or ()))  # every config checked before any run
    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = client.create_run(experiment_id, run_name=f"reproduce-{cfg.name}-{stamp}",
                               tags={"reproduce": "true", "pipeline": cfg.name,
                                     "variants": ",".join(variants), "seeds": ",".join(map(str, seeds))})
    parent_id = parent.info.run_id
    results = []
    try:
        for i, (variant, seed, resolved) in enumerate(runs, 1):
            logger.info(f"reproduce {i}/{len(runs)}: {variant}, seed {seed}")
            t0 = time.perf_counter()
            s = fusion_pipeline.with_options(flow_run_name=f"{cfg.name}-{variant}-s{seed}")(
                str(resolved), parent_run_id=parent_id)
            results.append({"variant": variant, "seed": seed, "version": s["version"], "run_id": s["run_id"],
                            "metrics": s["metrics"], "seconds": time.perf_counter() - t0,
                            "computed": [n for n, st in s["stages"].items() if not st["reused"]]})
            client.log_metric(parent_id, "runs_done", float(i))
        references = [v for v in variants if is_reference(v)]
        summary = summarise(results, references)
        seconds = time.perf_counter() - start
        out_dir = cfg.workspace.root / "reports" / f"reproduce-{cfg.name}-{stamp}"
        out_dir.mkdir(parents=True, exist_ok=True)
        means = {v: {k: s["mean"] for k, s in summary["table"][v].items()} for v in summary["variants"]}
        errors = {v: {k: (s["max"] - s["min"]) / 2 for k, s in summary["table"][v].items()} for v in summary["variants"]}
        shown = [m for m in sorted({k for v in means.values() for k in v})
                 if m == "interference" or not m.startswith("interference.") and m.endswith(("bits_per_byte", ".acc_norm", ".exact_match.strict-match",
                                                        "pass_at_1"))]
        chart = bar_chart(out_dir / "comparison.png", means, summary["variants"], shown,
                          title=f"{cfg.name}: strategies, mean over seeds {seeds}", highlight="adaptive",
                          errors=errors if len(seeds) > 1 else None)
        md = out_dir / "comparison.md"
        md.write_text(render_markdown(summary, results, title=f"Reproduce {cfg.name}", seconds=seconds,
                                      chart=chart.name))
        js = out_dir / "comparison.json"
        js.write_text(json.dumps({"summary": summary, "results": results, "seconds": seconds}, indent=2,
                                 default=str))
        for p in (md, js, chart):
            client.log_artifact(parent_id, str(p), "report")
        flat = {}
        for v in summary["variants"]:
            stats = summary["table"][v]
            for k in ("interference", "ppl.all.bits_per_byte"):
                if k in stats:
                    flat[f"{v}.{k}".replace(":", "_")] = stats[k]["mean"]
        for name, r in summary["reductions"].items():
            if r["of_means"] is not None:
                flat[f"interference_reduction.{name.replace(' ', '_')}"] = r["of_means"]
        flat["reproduce_seconds"] = seconds
        from tasks.tracking import clean_metrics

        for k, v in clean_metrics(flat).items():
            client.log_metric(parent_id, k, v)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    logger.info(f"reproduce: {len(results)} runs in {seconds / 60:.1f} min; report {md}")
    mlflow.set_tracking_uri(uri)
    return {"report": str(md), "json": str(js), "chart": str(chart), "seconds": seconds, "run_id": parent_id,
            "summary": summary, "results": results}
