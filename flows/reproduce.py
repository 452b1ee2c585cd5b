"""`fusion reproduce`: the strategy sweep of one config, then the comparison with interference.

Runs the pipeline once per (variant, seed) as a subflow (clm, each single source, min_ce,
avg_ce, adaptive, reference by default). Stages 1-3 are shared: the first run computes them,
the others reuse them. References come first, so every fused model's evaluation finds its
references. Every pipeline's MLflow run is nested under one `reproduce` run, which holds the
comparison: per variant the mean (and spread over seeds) of every headline metric; its
knowledge interference per unit (bits per byte, accuracy) against one reference set (clm and
every single-source variant, seed means before the best), from the per-item results of every
run, with bootstrap intervals over seeds and items; and the interference reduction of adaptive
against avg_ce and min_ce with its paired interval.
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
from fusion_core.eval_items import ITEMS_FILE, read_items, task_items
from fusion_core.interference import UNITS, Estimate, measure_interference, primary_scores

REFERENCE_VARIANTS = ("clm",)  # and single:<source> for each source
FUSED_VARIANTS = ("min_ce", "avg_ce", "adaptive", "reference")


def default_variants(cfg: PipelineConfig) -> list[str]:
    return ["clm", *[f"single:{s.name}" for s in cfg.sources], *FUSED_VARIANTS]


def variant_overrides(variant: str, seed: int) -> list[str]:
    """`--set` overrides for a variant: a strategy, `single:<source>`, `adaptive:<objective>`
    (likelihood, kd) or `adaptive:<scores>` (confidence; oracle_token, an ablation), then
    optional `+dotted.key=value` config overrides. Raises FusionError when malformed."""
    head, *extra = variant.split("+")
    name, _, option = head.partition(":")
    out = [f"fusion.strategy={name}", f"fusion.training.seed={seed}", *extra]
    if name == "single":
        if not option:
            raise FusionError(f"variant {variant!r}: single needs a source, single:<source name>")
        out.append(f"fusion.single_source={option}")
    elif name == "adaptive" and option in ("confidence", "oracle_token"):
        out.append(f"fusion.adaptive.scores={option}")
        if option == "oracle_token":
            out.append("fusion.adaptive.oracle_ablation=true")
    elif name == "adaptive" and option:
        out.append(f"fusion.adaptive.objective={option}")
    elif option:
        raise FusionError(f"variant {variant!r}: only single:<source>, adaptive:<objective> and "
                          f"adaptive:<confidence|oracle_token> take an option")
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


def _estimate(e: Estimate) -> dict:
    return {"value": e.value, "lo": e.lo, "hi": e.hi}


def summarise(results: list[dict], references: list[str], *, resamples: int = 1000, rng_seed: int = 0) -> dict:
    """Per variant: mean, min and max over seeds of each score; the knowledge interference of
    every variant against the one reference set (`references` that ran), per unit with bootstrap
    intervals over seeds and items; the reductions of adaptive against avg_ce and min_ce per
    unit, with paired intervals. `results`: {variant, seed, metrics, items}, items being the
    run's per-item records or the path of its items.jsonl (a run without them is left out of
    interference)."""
    per_run: dict[tuple[str, int], dict[str, float]] = {}
    items: dict[str, dict[int, dict]] = {}
    for r in results:
        per_run[(r["variant"], r["seed"])] = {**primary_scores(r["metrics"]), "ppl.all.bits_per_byte":
                                              r["metrics"].get("ppl.all.bits_per_byte", math.nan)}
        records = r.get("items")
        if isinstance(records, (str, Path)):
            records = read_items(Path(records)) if Path(records).is_file() else None
        if records is not None:
            items.setdefault(r["variant"], {})[r["seed"]] = task_items(records)
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
    study = measure_interference(items, [v for v in references if v in items],
                                 models=[v for v in variants if v in items], resamples=resamples, rng_seed=rng_seed)
    inter = {}
    for v, i in study.models.items():
        inter[v] = {"units": {u: _estimate(e) for u, e in i.units.items()},
                    "tasks": {u: len(i.unit_tasks(u)) for u in i.units},
                    "tasks_hurt": {u: sum(t.hurt for t in i.unit_tasks(u)) for u in i.units},
                    "hurt": [t.task for t in i.tasks if t.hurt], "references": list(i.references),
                    "drops": {t.task: {**_estimate(t.drop), "best_model": t.best_model} for t in i.tasks}}
    red = {}
    if "adaptive" in study.models:
        for other in ("avg_ce", "min_ce"):
            if other in study.models:
                red[f"adaptive vs {other}"] = {u: _estimate(study.reduction("adaptive", other, u)) for u in UNITS}
    return {"variants": variants, "table": table, "interference": inter, "reductions": red,
            "bootstrap": {"resamples": study.resamples, "level": study.level, "rng_seed": study.rng_seed,
                          "seeds": list(study.seeds)},
            "runs": {f"{v} seed {s}": m for (v, s), m in per_run.items()}}


def render_markdown(summary: dict, results: list[dict], *, title: str, seconds: float, chart: str | None) -> str:
    from fusion_core.reporting import BEST_MARK, best_columns, better_low, fmt

    variants = summary["variants"]
    table = summary["table"]
    metrics = sorted({k for v in variants for k in table[v]}, key=lambda m: (not m.startswith("ppl."), m))
    means = {v: {k: s["mean"] for k, s in table[v].items()} for v in variants}
    seeds = sorted({r["seed"] for r in results})
    lines = [f"# {title}", "",
             f"{len(results)} pipeline runs ({len(variants)} variants x seeds {seeds}) in {seconds / 60:.1f} min. "
             f"Mean over seeds" + (" (min-max)" if len(seeds) > 1 else "") + f"; {BEST_MARK} best per row "
             "(↓ lower is better).", "",
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
    lines += _interference_lines(summary)
    lines += ["", "## Interference reduction of adaptive", ""]
    if summary["reductions"]:
        lines += ["1 - I(adaptive) / I(other) per unit, with its paired bootstrap interval.", "",
                  "| against | bits per byte [lo, hi] | accuracy [lo, hi] |", "|---|---|---|"]
        for name, r in summary["reductions"].items():
            lines.append(f"| {name.split(' vs ')[1]} | {_pct(r.get('bpb'))} | {_pct(r.get('acc'))} |")
        if any(e["value"] is None for r in summary["reductions"].values() for e in r.values()):
            lines += ["", "n/a: the other strategy shows no interference to reduce in that unit (or it was not "
                      "measured)."]
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


def _flat_estimate(name: str, e: dict) -> dict[str, float]:
    """`{name: value, name.lo: lo, name.hi: hi}`, the finite parts."""
    parts = {name: e["value"], f"{name}.lo": e["lo"], f"{name}.hi": e["hi"]}
    return {k: v for k, v in parts.items() if v is not None and math.isfinite(v)}


def _pct(e: dict | None) -> str:
    if not e or e["value"] is None:
        return "n/a"
    bound = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    return f"{e['value']:.1%} [{bound(e['lo'])}, {bound(e['hi'])}]"


def _interference_lines(summary: dict) -> list[str]:
    """The knowledge-interference section: per variant and unit, the figure and its interval."""
    inter, boot = summary["interference"], summary["bootstrap"]
    lines = ["", "## Knowledge interference", ""]
    if not any(i["units"] for i in inter.values()):
        return lines + ["Not measured: the sweep needs clm or a single-source variant beside the others."]
    refs = next(iter(inter.values()))["references"]
    lines += [f"docs/method.md: one reference set R = {{{', '.join(refs)}}}; per task, best = the best seed mean in R, "
              "drop = max(0, best - seed mean). bits per byte: mean relative drop; accuracy: mean drop in accuracy "
              f"points. [lo, hi]: {boot['level']:.0%} bootstrap interval over seeds {boot['seeds']} and items "
              f"({boot['resamples']} resamples); a task is hurt when the interval on its drop excludes 0.", "",
              "| variant | bits per byte [lo, hi] | tasks hurt | accuracy, points [lo, hi] | tasks hurt |",
              "|---|---|---|---|---|"]
    for v, i in inter.items():
        cells = []
        for unit, scale in (("bpb", 1.0), ("acc", 100.0)):
            e = i["units"].get(unit)
            if e is None:
                cells += ["-", "-"]
                continue
            bound = lambda x: "n/a" if x is None else f"{x * scale:.4g}"  # noqa: E731
            cells += [f"{e['value'] * scale:.4g} [{bound(e['lo'])}, {bound(e['hi'])}]",
                      f"{i['tasks_hurt'][unit]} of {i['tasks'][unit]}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


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
                            "items": str(Path(s["stages"]["evaluate"]["path"]) / ITEMS_FILE),
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
                 if m.endswith(("bits_per_byte", ".acc_norm", ".exact_match.strict-match", "pass_at_1"))]
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
            if "ppl.all.bits_per_byte" in summary["table"][v]:
                flat[f"{v}.ppl.all.bits_per_byte".replace(":", "_")] = summary["table"][v]["ppl.all.bits_per_byte"]["mean"]
            for unit, e in summary["interference"].get(v, {}).get("units", {}).items():
                flat.update(_flat_estimate(f"{v}.interference.{unit}".replace(":", "_"), e))
        for name, r in summary["reductions"].items():
            for unit, e in r.items():
                flat.update(_flat_estimate(f"interference_reduction.{name.replace(' ', '_')}.{unit}", e))
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
