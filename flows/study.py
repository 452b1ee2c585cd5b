"""`fusion study`: does adaptive selection beat FuseLLM? The experimental protocol of docs/method.md.

1. Tuning, on validation: every strategy (variant) gets the same budget, the same grid of
   settings (default: the student's learning rate in {1e-3, 3e-3}), trained with the first seed
   and scored on the validation split's bits per byte (the mean over the training domains).
2. Final runs, on test: every variant at its best validation setting, once per seed (default 5
   seeds); a seed varies the target's initialisation (`fusion.training.reinit_target`), the data
   order and the selector's initialisation. The test split (and the held-out mixed-domain set in
   it) is touched by no choice.
3. The report: per variant and task (bits per byte per domain, multiple-choice accuracy) the mean
   over seeds with a 95 % bootstrap interval over seeds and items; knowledge interference per
   unit against one reference set (clm and every single-source student); the paired difference
   of each adaptive variant against each baseline (same seeds, same documents) with its interval
   and whether it is significant; routing accuracy against the per-document oracle and the
   selector's usage per domain; the mixed-domain set on its own.

Every pipeline is an MLflow run nested under one `study-<name>-<time>` run, which holds the
report (markdown, JSON, chart). The study is resumable: each finished pipeline is journaled in
`<workspace>/studies/<name>/runs/` under its resolved config's fingerprint, and every stage is
reused from the workspace anyway, so a rerun after an interruption continues where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from prefect import flow

from fusion_core.config import PipelineConfig, load_config
from fusion_core.errors import FusionError

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_TUNING = "fusion.training.learning_rate=1e-3,3e-3"
FUSED = ("min_ce", "avg_ce", "uniform", "adaptive", "adaptive:kd", "adaptive:confidence")
# What every study run shares: seeds vary the initialisation; the study measures interference
# itself from the per-item results, so the pipelines evaluate their own model only.
COMMON = ("fusion.training.reinit_target=true", "evaluation.references=[]", "evaluation.humaneval.enabled=false")
TUNE = ("evaluation.split=validation", "evaluation.lm_eval_tasks=[]")
FINAL = ("evaluation.split=test",)


def default_variants(cfg: PipelineConfig) -> list[str]:
    """clm, single:<each source>, then min_ce, avg_ce, uniform and the adaptive variants."""
    return ["clm", *[f"single:{s.name}" for s in cfg.sources], *FUSED]


def is_reference(variant: str) -> bool:
    from flows.reproduce import is_reference as ref

    return ref(variant)


def is_adaptive(variant: str) -> bool:
    return variant.split("+")[0].split(":")[0] == "adaptive"


def parse_tuning(spec: str | None) -> list[list[str]]:
    """`key=v1,v2,...` -> one override list per value ([[]] for None or "none": no tuning)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return [[]]
    key, eq, values = spec.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not key.strip() or not vals:
        raise FusionError(f"--tune {spec!r}: expected dotted.key=value1,value2 (or none)")
    return [[f"{key.strip()}={v}"] for v in vals]


def training_domains(cfg: PipelineConfig) -> list[str]:
    return sorted({c.domain for c in cfg.data.corpora if not getattr(c, "heldout", False)})


def heldout_domains(cfg: PipelineConfig) -> list[str]:
    return sorted({c.domain for c in cfg.data.corpora if getattr(c, "heldout", False)}
                  - set(training_domains(cfg)))


def selection_score(metrics: dict[str, float], domains: Sequence[str]) -> float:
    """The tuning criterion: the mean over the training domains of validation bits per byte
    (each domain counts once, whatever its size; lower is better). NaN when one is missing."""
    vals = [metrics.get(f"ppl.{d}.bits_per_byte", math.nan) for d in domains]
    return statistics.mean(vals) if vals and all(math.isfinite(v) for v in vals) else math.nan


@dataclass
class PlannedRun:
    phase: str           # "tune" or "final"
    variant: str
    seed: int
    setting: int         # index into the tuning grid
    overrides: list[str]
    resolved: Path       # the resolved config file the pipeline runs
    fingerprint: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


def plan_run(config_path: Path, base: Sequence[str], phase: str, variant: str, seed: int, setting: int,
             grid: list[list[str]], inputs_key: str = "") -> PlannedRun:
    """Resolve and validate one run's config (raises ConfigError/FusionError before anything runs).
    `inputs_key` (`inputs_fingerprint`) names the contents of the models and corpora it reads."""
    from flows.pipeline import write_resolved_config
    from flows.reproduce import variant_overrides
    from fusion_core.workspace import fingerprint

    extra = [*COMMON, *(TUNE if phase == "tune" else FINAL)]
    overrides = [*base, *extra, *grid[setting], *variant_overrides(variant, seed)]
    from tasks.stage import STAGE_VERSIONS

    cfg = load_config(config_path, overrides=overrides)
    resolved = write_resolved_config(cfg)
    # the stage versions and the inputs' contents too: a journaled result of older stage code, or of
    # models or corpora changed in place since, is not taken back
    key = fingerprint(resolved.read_text(), STAGE_VERSIONS, inputs_key)[:16]
    return PlannedRun(phase, variant, seed, setting, overrides, resolved, key)


def inputs_fingerprint(cfg: PipelineConfig) -> str:
    """A fingerprint of the contents of every model and corpus file the study's pipelines read
    (the same content keys the stages use; file hashes are cached by path, size and mtime)."""
    from fusion_core.workspace import fingerprint
    from tasks.prepare_data import corpus_contents
    from tasks.resolve_models import resolve_models

    sources, target = resolve_models(cfg)
    return fingerprint([s.key for s in sources], target.key, corpus_contents(cfg))


class Journal:
    """Finished pipeline runs of a study, one JSON file each, keyed by the resolved config's
    fingerprint; a file is written atomically once its pipeline finished, and only taken back
    while the evaluation it names is still complete in the workspace."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, run: PlannedRun) -> Path:
        return self.folder / f"{run.phase}-{_slug(run.variant)}-s{run.seed}-{run.fingerprint}.json"

    def get(self, run: PlannedRun) -> dict | None:
        path = self._path(run)
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            return None
        manifest = Path(rec.get("evaluate_path", "")) / "manifest.json"
        return rec if manifest.is_file() else None

    def put(self, run: PlannedRun, record: dict) -> None:
        from fusion_core.workspace import write_json_atomic

        write_json_atomic(self._path(run), record)


def _stage_metrics(path: str | Path) -> dict[str, float]:
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return {}
    meta = json.loads(manifest.read_text())
    return dict(meta.get("meta", meta).get("metrics", {}))


def _record(run: PlannedRun, summary: dict, seconds: float) -> dict:
    stages = summary["stages"]
    return {"phase": run.phase, "variant": run.variant, "seed": run.seed, "setting": run.setting,
            "overrides": run.overrides, "config": str(run.resolved), "fingerprint": run.fingerprint,
            "run_id": summary["run_id"], "version": summary.get("version"), "metrics": summary["metrics"],
            "training": _stage_metrics(stages["fusion_training"]["path"]),
            "evaluate_path": stages["evaluate"]["path"], "seconds": seconds,
            "computed": [n for n, st in stages.items() if not st["reused"]]}


# ---------------------------------------------------------------- analysis

def _items_of(records: list[dict]) -> dict[str, dict[int, dict]]:
    from fusion_core.eval_items import ITEMS_FILE, read_items, task_items

    out: dict[str, dict[int, dict]] = {}
    for r in records:
        path = Path(r["evaluate_path"]) / ITEMS_FILE
        if path.is_file():
            out.setdefault(r["variant"], {})[r["seed"]] = task_items(read_items(path))
    return out


def _estimate(e) -> dict:
    return {"value": e.value, "lo": e.lo, "hi": e.hi, "significant": bool(e.excludes_zero)}


def score_estimate(model_items: dict[int, dict], task: str, **kw):
    """A model's score on `task` (mean over seeds) with its bootstrap interval over seeds and
    items: the paired difference against a model that scores 0 on the same items."""
    from fusion_core.interference import TaskItems, paired_difference

    zero = {s: {task: TaskItems(t[task].ids, [0.0] * len(t[task].ids), t[task].bytes)} for s, t in model_items.items()}
    return paired_difference(model_items, zero, task, **kw)


def analyse(final: list[dict], tuning: list[dict], variants: list[str], domains: list[str], heldout: list[str],
            *, resamples: int = 1000) -> dict:
    """The study's numbers (JSON-ready): scores with intervals, interference, paired differences,
    routing, the tuning table and the validation winner."""
    from fusion_core.interference import UNITS, measure_interference, paired_difference

    items = _items_of(final)
    seeds = sorted({r["seed"] for r in final})
    complete = [v for v in variants if v in items and sorted(items[v]) == seeds]
    tasks = sorted({t for v in complete for s in items[v] for t in items[v][s]},
                   key=lambda t: (not t.startswith("ppl."), t))
    scores: dict[str, dict[str, dict]] = {}
    for v in complete:
        scores[v] = {}
        for t in tasks:
            if all(t in items[v][s] for s in seeds):
                scores[v][t] = _estimate(score_estimate(items[v], t, resamples=resamples))
    refs = [v for v in complete if is_reference(v)]
    study = measure_interference({v: items[v] for v in complete}, refs, models=complete, resamples=resamples)
    interference = {v: {"units": {u: _estimate(e) for u, e in i.units.items()},
                        "tasks_hurt": {u: sum(t.hurt for t in i.unit_tasks(u)) for u in i.units},
                        "tasks": {u: len(i.unit_tasks(u)) for u in i.units}}
                    for v, i in study.models.items()}
    baselines = [v for v in complete if not is_adaptive(v)]
    paired: dict[str, dict[str, dict[str, dict]]] = {}
    reductions: dict[str, dict[str, dict]] = {}
    for a in [v for v in complete if is_adaptive(v)]:
        paired[a] = {}
        for b in baselines + [v for v in complete if is_adaptive(v) and v != a]:
            paired[a][b] = {}
            for t in tasks:
                if t in scores.get(a, {}) and t in scores.get(b, {}):
                    paired[a][b][t] = _estimate(paired_difference(items[a], items[b], t, resamples=resamples))
            if a in study.models and b in study.models and not is_reference(b):
                reductions.setdefault(a, {})[b] = {u: _estimate(study.reduction(a, b, u)) for u in UNITS}
    routing: dict[str, dict[str, dict]] = {}
    for v in variants:
        rows = [r["training"] for r in final if r["variant"] == v]
        keys = sorted({k for m in rows for k in m if k.startswith("routing.")})
        routing[v] = {}
        for k in keys:
            vals = [m[k] for m in rows if k in m and math.isfinite(m[k])]
            if vals:
                routing[v][k] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    tune_table: dict[str, list[dict]] = {}
    for r in tuning:
        tune_table.setdefault(r["variant"], []).append(
            {"setting": r["setting"], "overrides": r["grid"], "score": r["score"]})
    chosen = {v: min(rows, key=lambda x: (not math.isfinite(x["score"]), x["score"]))
              for v, rows in tune_table.items() if rows}
    fused = {v: c["score"] for v, c in chosen.items() if not is_reference(v) and math.isfinite(c["score"])}
    winner = min(fused, key=fused.get) if fused else None
    return {"seeds": seeds, "variants": complete, "missing": [v for v in variants if v not in complete],
            "tasks": tasks, "training_domains": domains, "heldout_domains": heldout, "scores": scores,
            "interference": interference, "references": refs,
            "bootstrap": {"resamples": resamples, "level": study.level, "seeds": list(study.seeds)},
            "paired": paired, "reductions": reductions, "routing": routing, "tuning": tune_table,
            "chosen": {v: {"setting": c["setting"], "overrides": c["overrides"], "score": c["score"]}
                       for v, c in chosen.items()},
            "validation_winner": winner}


# ---------------------------------------------------------------- report

def _fmt(e: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    if not e or e.get("value") is None:
        return "-"
    f = lambda v: "?" if v is None else f"{v * scale:.{digits}f}"  # noqa: E731
    return f"{f(e['value'])} [{f(e['lo'])}, {f(e['hi'])}]"


def _task_label(task: str) -> str:
    m = re.fullmatch(r"ppl\.(.+)\.bits_per_byte", task)
    if m:
        return f"{m.group(1)} bits/byte ↓"
    return task.removeprefix("eval.") + " ↑"


def render_markdown(a: dict, records: list[dict], *, title: str, seconds: float, load: dict, chart: str | None,
                    grid: list[list[str]]) -> str:
    v_all = a["variants"]
    lines = [f"# {title}", "",
             f"{len(records)} pipeline runs in {seconds / 60:.1f} min (load average {load['start']:.2f} at the start, "
             f"{load['end']:.2f} at the end, {os.cpu_count()} cores). Test split, seeds {a['seeds']}; every figure is "
             f"the mean over seeds with its {a['bootstrap']['level']:.0%} bootstrap interval over seeds and items "
             f"({a['bootstrap']['resamples']} resamples).", ""]
    if a["missing"]:
        lines += [f"Not in the tables (some seed missing): {', '.join(a['missing'])}.", ""]
    lines += ["## Tuning on validation", "",
              f"The same budget for every variant: {len(grid)} setting(s), "
              f"{'; '.join(' '.join(g) or 'the config as it is' for g in grid)}; trained with seed {a['seeds'][0] if a['seeds'] else '-'}, "
              f"scored by the mean validation bits per byte over the training domains ({', '.join(a['training_domains'])}).",
              "", "| variant | " + " | ".join(f"setting {i}" for i in range(len(grid))) + " | chosen |",
              "|---|" + "---|" * (len(grid) + 1)]
    for v, rows in a["tuning"].items():
        by = {r["setting"]: r["score"] for r in rows}
        cells = [f"{by[i]:.4f}" if i in by and math.isfinite(by[i]) else "-" for i in range(len(grid))]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {a['chosen'].get(v, {}).get('setting', '-')} |")
    if a["validation_winner"]:
        lines += ["", f"Validation winner among the fusion strategies: **{a['validation_winner']}**."]
    lines += ["", "## Test scores", ""]
    tasks = a["tasks"]
    lines += ["| variant | " + " | ".join(_task_label(t) for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for v in v_all:
        lines.append(f"| {v} | " + " | ".join(_fmt(a["scores"][v].get(t), 3) for t in tasks) + " |")
    if a["heldout_domains"]:
        lines += ["", f"Held out (never trained on): {', '.join(a['heldout_domains'])}: documents that switch domain "
                      "inside, where per-token selection (adaptive:confidence) could beat per-document selection."]
    lines += ["", "## Knowledge interference", "",
              f"One reference set R = {{{', '.join(a['references'])}}}, each reference's score averaged over seeds "
              "before the best is taken. bits per byte: mean relative drop; accuracy: mean drop in accuracy points. "
              "A task counts as hurt when the interval of its drop excludes 0.", "",
              "| variant | bits per byte | hurt | accuracy (points) | hurt |", "|---|---|---|---|---|"]
    for v in v_all:
        i = a["interference"].get(v, {})
        u = i.get("units", {})
        hurt = lambda unit: f"{i['tasks_hurt'][unit]} of {i['tasks'][unit]}" if unit in u else "-"  # noqa: E731
        lines.append(f"| {v} | {_fmt(u.get('bpb'), 4)} | {hurt('bpb')} | {_fmt(u.get('acc'), 2, 100)} | {hurt('acc')} |")
    lines += ["", "## Paired differences: adaptive against each baseline", "",
              "A - B per task, same seeds and documents; bits per byte: negative means A is better; accuracy: "
              "positive means A is better. **bold**: the interval excludes 0 (significant at 95 %)."]
    for av, against in a["paired"].items():
        lines += ["", f"### {av}", "", "| against | " + " | ".join(_task_label(t) for t in tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for b, per in against.items():
            cells = []
            for t in tasks:
                e = per.get(t)
                txt = _fmt(e, 3)
                cells.append(f"**{txt}**" if e and e["significant"] else txt)
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        red = a["reductions"].get(av, {})
        if red:
            lines += ["", "Interference reduction 1 - I(A)/I(B): " + "; ".join(
                f"{b}: bpb {_fmt(r.get('bpb'), 3)}, acc {_fmt(r.get('acc'), 3)}" for b, r in red.items())]
    lines += ["", "## Routing", "",
              "Share of training documents whose highest-weight source is the per-document oracle (the lowest NLL "
              "per byte), by the trained strategy, mean over seeds (min-max).", ""]
    doms = sorted({k.split(".", 2)[2] for r in a["routing"].values() for k in r if k.startswith("routing.accuracy.")})
    lines += ["| variant | " + " | ".join(doms) + " | exact positions |", "|---|" + "---|" * (len(doms) + 1)]
    for v, r in a["routing"].items():
        if not r:
            continue
        cell = lambda k: (f"{r[k]['mean']:.3f} ({r[k]['min']:.2f}-{r[k]['max']:.2f})" if k in r else "-")  # noqa: E731
        lines.append(f"| {v} | " + " | ".join(cell(f"routing.accuracy.{d}") for d in doms)
                     + f" | {cell('routing.exact_positions')} |")
    usage = [v for v in a["routing"] if is_adaptive(v) and a["routing"][v]]
    if usage:
        lines += ["", "Mean source weight per domain (trained selectors):", ""]
        for v in usage:
            ws = sorted(k for k in a["routing"][v] if k.startswith("routing.weight."))
            by_dom: dict[str, list[str]] = {}
            for k in ws:
                _, _, src, dom = k.split(".", 3)
                by_dom.setdefault(dom, []).append(f"{src} {a['routing'][v][k]['mean']:.2f}")
            lines.append(f"- {v}: " + "; ".join(f"{d}: {', '.join(s)}" for d, s in sorted(by_dom.items())))
    lines += ["", "## Runs", "", "| phase | variant | seed | setting | seconds | computed stages |",
              "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['phase']} | {r['variant']} | {r['seed']} | {r['setting']} | {r['seconds']:.0f} | "
                     f"{', '.join(r['computed']) or 'none (reused)'} |")
    if chart:
        lines += ["", f"![chart]({chart})"]
    return "\n".join(lines) + "\n"


def _flat_metrics(a: dict) -> dict[str, float]:
    out: dict[str, float] = {}

    def put(name: str, e: dict | None) -> None:
        if e and e.get("value") is not None:
            for suffix, key in (("", "value"), (".lo", "lo"), (".hi", "hi")):
                if e.get(key) is not None and math.isfinite(e[key]):
                    out[_slug(name + suffix).replace(":", "_")] = float(e[key])

    for v, per in a["scores"].items():
        for t, e in per.items():
            put(f"{v}.{t}", e)
    for v, i in a["interference"].items():
        for u, e in i["units"].items():
            put(f"{v}.interference.{u}", e)
    for av, against in a["paired"].items():
        for b, per in against.items():
            for t, e in per.items():
                put(f"diff.{av}.vs.{b}.{t}", e)
    for v, r in a["routing"].items():
        for k, s in r.items():
            out[_slug(f"{v}.{k}").replace(":", "_")] = float(s["mean"])
    return out


# ---------------------------------------------------------------- the flow

@flow(name="fusion_study", log_prints=True)
def fusion_study(config_path: str, seeds: list[int] | None = None, variants: list[str] | None = None,
                 tune: str | None = DEFAULT_TUNING, overrides: list[str] | None = None,
                 resamples: int = 1000) -> dict:
    """Run the study for the config at `config_path`; returns where its report is and its numbers."""
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import fusion_pipeline
    from fusion_core.reporting import bar_chart
    from tasks.common import run_logger
    from tasks.tracking import clean_metrics, ensure_experiment, tracking_uri

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    logger = run_logger()
    path = Path(config_path)
    base = list(overrides or ())
    cfg = load_config(path, overrides=base)
    seeds = list(seeds) if seeds else list(DEFAULT_SEEDS)
    variants = list(dict.fromkeys(variants or default_variants(cfg)))
    grid = parse_tuning(tune)
    domains, heldout = training_domains(cfg), heldout_domains(cfg)
    ordered = sorted(variants, key=lambda v: not is_reference(v))
    # Every tuning config is resolved and checked before anything runs.
    inputs_key = inputs_fingerprint(cfg)
    tuning_plan = [plan_run(path, base, "tune", v, seeds[0], i, grid, inputs_key)
                   for v in ordered for i in range(len(grid))]
    journal = Journal(cfg.workspace.root / "studies" / cfg.name / "runs")
    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = client.create_run(experiment_id, run_name=f"study-{cfg.name}-{stamp}",
                               tags={"study": "true", "pipeline": cfg.name, "variants": ",".join(variants),
                                     "seeds": ",".join(map(str, seeds)), "tuning": tune or "none"})
    parent_id = parent.info.run_id
    records: list[dict] = []
    done = 0

    def execute(run: PlannedRun) -> dict:
        nonlocal done
        rec = journal.get(run)
        if rec is None:
            logger.info(f"study: {run.phase} {run.variant} seed {run.seed} setting {run.setting}")
            t0 = time.perf_counter()
            s = fusion_pipeline.with_options(flow_run_name=f"{cfg.name}-{run.phase}-{run.variant}-s{run.seed}")(
                str(run.resolved), parent_run_id=parent_id)
            rec = _record(run, s, time.perf_counter() - t0)
            journal.put(run, rec)
        else:
            logger.info(f"study: {run.phase} {run.variant} seed {run.seed} setting {run.setting}: journaled, reused")
            rec = {**rec, "computed": [], "seconds": 0.0}
        records.append(rec)
        done += 1
        client.log_metric(parent_id, "runs_done", float(done))
        return rec

    try:
        for k, v in {"seeds": ",".join(map(str, seeds)), "tuning": tune or "none",
                     "variants": ",".join(variants)[:500], "resamples": str(resamples)}.items():
            client.log_param(parent_id, k, v)
        tuning = []
        for run in tuning_plan:
            rec = execute(run)
            tuning.append({"variant": run.variant, "setting": run.setting, "grid": grid[run.setting],
                           "score": selection_score(rec["metrics"], domains)})
        best = {}
        for v in ordered:
            rows = [t for t in tuning if t["variant"] == v]
            best[v] = min(rows, key=lambda x: (not math.isfinite(x["score"]), x["score"]))["setting"]
        final_plan = [plan_run(path, base, "final", v, s, best[v], grid, inputs_key) for s in seeds for v in ordered]
        final = [execute(run) for run in final_plan]
        a = analyse(final, tuning, variants, domains, heldout, resamples=resamples)
        seconds = time.perf_counter() - start
        load = {"start": load_start, "end": os.getloadavg()[0]}
        out_dir = cfg.workspace.root / "reports" / f"study-{cfg.name}-{stamp}"
        out_dir.mkdir(parents=True, exist_ok=True)
        bpb = [t for t in a["tasks"] if t.startswith("ppl.")]
        means = {v: {t: e["value"] for t, e in a["scores"][v].items()} for v in a["variants"]}
        errors = {v: {t: (e["hi"] - e["lo"]) / 2 for t, e in a["scores"][v].items()
                      if e["hi"] is not None and e["lo"] is not None} for v in a["variants"]}
        chart = bar_chart(out_dir / "study.png", means, a["variants"], bpb,
                          title=f"{cfg.name}: test bits per byte, mean over seeds {a['seeds']} (95 % interval)",
                          highlight="adaptive", errors=errors)
        md = out_dir / "study.md"
        md.write_text(render_markdown(a, records, title=f"Strategy study: {cfg.name}", seconds=seconds, load=load,
                                      chart=Path(chart).name if chart else None, grid=grid))
        js = out_dir / "study.json"
        js.write_text(json.dumps({"analysis": a, "records": records, "seconds": seconds, "load": load,
                                  "grid": grid}, indent=2, default=str))
        for p in (md, js, chart):
            if p:
                client.log_artifact(parent_id, str(p), "report")
        flat = clean_metrics({**_flat_metrics(a), "study_seconds": seconds})
        for k, v in flat.items():
            client.log_metric(parent_id, k, v)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    logger.info(f"study: {len(records)} runs in {seconds / 60:.1f} min; report {md}")
    mlflow.set_tracking_uri(uri)
    return {"report": str(md), "json": str(js), "chart": str(chart), "seconds": seconds, "run_id": parent_id,
            "analysis": a}
