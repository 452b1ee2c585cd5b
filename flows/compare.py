"""Registered versions, or the pipeline runs of an experiment, side by side: a row per shared
metric, a column per model, the best value of each row marked; in the terminal, as JSON, or as a
markdown / HTML report with a chart."""
from __future__ import annotations

import time
from pathlib import Path

from fusion_core.errors import FusionError
from fusion_core.interference import reduction
from fusion_core.reporting import (
    BEST_MARK,
    bar_chart,
    best_columns,
    better_low,
    fmt,
    html_page,
    html_table,
    markdown_table,
    shared_metrics,
)

HEADLINE = (".bits_per_byte", ".acc_norm", ".exact_match.strict-match", "humaneval.pass_at_1")
INTERFERENCE_UNITS = {"interference.bpb": "bits per byte", "interference.acc": "accuracy"}
_BOOKKEEPING = (".n_samples", ".documents", ".tokens", ".bytes", ".nll_per_token", ".references", ".tasks")


def is_score(metric: str) -> bool:
    """A metric worth comparing: task scores, held-out text scores, HumanEval pass@1, interference."""
    if "_stderr" in metric or metric.endswith(_BOOKKEEPING) or metric.startswith("humaneval.status."):
        return False
    return metric.startswith(("eval.", "ppl.", "humaneval.", "interference"))


def short_name(metric: str) -> str:
    """ppl.code.bits_per_byte -> code bpb; eval.fusion_code_mc.acc_norm -> fusion_code_mc acc_n."""
    name = metric.removeprefix("ppl.").removeprefix("eval.")
    return (name.replace(".bits_per_byte", " bpb").replace(".acc_norm", " acc_n")
            .replace(".exact_match.strict-match", " em").replace(".perplexity", " ppl"))


def describe(tags: dict) -> str:
    """strategy[:single source | :objective lr] from a version's or run's tags."""
    strategy = tags.get("strategy", "?")
    if strategy == "single":
        strategy += f":{tags.get('single_source', '?')}"
    elif strategy == "adaptive" and "adaptive.objective" in tags:
        lr = tags.get("adaptive.learning_rate", "None")
        strategy += f":{tags['adaptive.objective']}" + ("" if lr == "None" else f" lr {lr}")
    return strategy


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def version_metrics(client, name: str, mv) -> tuple[dict[str, float], str | None]:
    """A version's metrics from its latest evaluation: the newest evaluate run tagged with the
    version (a later pipeline run may have measured interference against more references),
    else the run that registered it. Returns (metrics, run id)."""
    runs = []
    try:
        exp_id = client.get_run(mv.run_id).info.experiment_id if mv.run_id else None
        if exp_id is not None:
            runs = client.search_runs([exp_id], filter_string=f"tags.registered_model = '{name}' and "
                                                              f"tags.registered_version = '{mv.version}' and "
                                                              f"tags.stage = 'evaluate'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    except Exception:  # noqa: BLE001 - the registering run below is the fallback
        runs = []
    run_id = runs[0].info.run_id if runs else mv.run_id
    if run_id is None:
        return {}, None
    return dict(client.get_run(run_id).data.metrics), run_id


def list_versions(tracking_uri: str, name: str, versions: list[int] | None = None) -> list[dict]:
    """Versions of registered model `name` (all, or those in `versions`): aliases, tags and the
    metrics of their latest evaluation. Raises FusionError when the model or a version does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise FusionError(f"no registered model {name!r} at {tracking_uri}") from None
    found = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    if versions:
        have = {int(v.version) for v in found}
        missing = sorted(set(versions) - have)
        if missing:
            raise FusionError(f"registered model {name!r} has no version(s) {missing}; it has "
                              f"{sorted(have) if len(have) < 30 else f'{min(have)}..{max(have)}'}")
        found = [v for v in found if int(v.version) in set(versions)]
    rows = []
    for v in found:
        mv = client.get_model_version(name, v.version)  # search results carry no aliases
        metrics, run_id = version_metrics(client, name, mv)
        tags = dict(mv.tags or {})
        rows.append({"id": f"v{mv.version}", "name": name, "version": str(mv.version),
                     "aliases": sorted(mv.aliases or []), "run_id": run_id, "created": mv.creation_timestamp,
                     "strategy": describe(tags), "seed": tags.get("seed", ""), "tags": tags,
                     "metrics": {k: m for k, m in sorted(metrics.items()) if is_score(k)}})
    return rows


def list_runs(tracking_uri: str, experiment: str, limit: int = 20) -> list[dict]:
    """The newest `limit` pipeline runs (parent runs) of `experiment` that finished, newest last."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FusionError(f"no experiment {experiment!r} at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    pipeline_runs = [r for r in runs if "config_fingerprint" in r.data.tags and "stage" not in r.data.tags][:limit]
    rows = []
    for r in reversed(pipeline_runs):
        tags = dict(r.data.tags)
        rows.append({"id": r.info.run_name or r.info.run_id[:8], "run_id": r.info.run_id,
                     "aliases": [], "version": tags.get("registered_model", ""), "strategy": describe(tags),
                     "seed": tags.get("seed", ""), "tags": tags,
                     "metrics": {k: v for k, v in sorted(r.data.metrics.items()) if is_score(k)}})
    return rows


def select_metrics(rows: list[dict], patterns: list[str] | None, *, headline_only: bool = False) -> list[str]:
    """Metrics every row has, those containing one of `patterns` (default: all scores, or the
    headline ones), held-out text first, interference last."""
    table = {r["id"]: r["metrics"] for r in rows}
    names = shared_metrics(table, [r["id"] for r in rows])
    if patterns:
        names = [m for m in names if any(p in m for p in patterns)]
    elif headline_only:
        names = [m for m in names if m in (*INTERFERENCE_UNITS, "interference.tasks_hurt")
                 or (m.endswith(HEADLINE) and not m.startswith("interference."))]
    return sorted(names, key=lambda m: (m.startswith("interference"), not m.startswith("ppl."), m))


def column_names(rows: list[dict]) -> dict[str, str]:
    out = {}
    for r in rows:
        alias = f" @{','.join(r['aliases'])}" if r.get("aliases") else ""
        seed = f" s{r['seed']}" if r.get("seed") not in (None, "") else ""
        out[r["id"]] = f"{r['id']}{alias} {r['strategy']}{seed}"
    return out


def render_terminal(rows: list[dict], metrics: list[str]) -> None:
    """A rich table: a row per metric, a column per model, the best value per row in bold ★."""
    from rich.console import Console
    from rich.table import Table

    table_data = {r["id"]: r["metrics"] for r in rows}
    ids = [r["id"] for r in rows]
    names = column_names(rows)
    table = Table(title=f"{len(rows)} model(s) side by side ({BEST_MARK} best; ↓ lower is better)")
    table.add_column("metric", no_wrap=True)
    for i in ids:
        table.add_column(names[i], justify="right")
    for m in metrics:
        best = best_columns(table_data, m, ids)
        cells = [(f"[bold green]{fmt(table_data[i].get(m))} {BEST_MARK}[/]" if i in best else fmt(table_data[i].get(m)))
                 for i in ids]
        table.add_row(f"{short_name(m)} {'↓' if better_low(m) else '↑'}", *cells)
    Console(width=max(100, 30 + 16 * len(ids))).print(table)


def reductions(rows: list[dict], metric: str = "interference.bpb") -> dict[str, dict[str, float]]:
    """`{a: {b: 1 - I(a)/I(b)}}` for the models with a measured interference `metric` (one unit:
    interference.bpb or interference.acc; point values, the intervals need the items)."""
    values = {r["id"]: r["metrics"].get(metric) for r in rows}
    have = [i for i, v in values.items() if v is not None]
    return {a: {b: red for b in have if b != a and (red := reduction(values[a], values[b])) is not None}
            for a in have}


def write_report(rows: list[dict], metrics: list[str], out: Path, fmt_: str, *, title: str) -> Path:
    """A markdown or HTML report (the table, the interference reductions, a PNG chart beside it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = {r["id"]: r["metrics"] for r in rows}
    ids = [r["id"] for r in rows]
    names = column_names(rows)
    charted = [m for m in metrics if m in INTERFERENCE_UNITS or (m.endswith(HEADLINE) and not m.startswith("interference."))]
    chart = bar_chart(out.with_suffix(".png"), table, ids, charted or metrics[:9],
                      title=title, names={i: i for i in ids})
    per_unit = {metric: reductions(rows, metric) for metric in INTERFERENCE_UNITS}
    if fmt_ == "html":
        body = html_table(table, ids, metrics, names=names)
        for metric, red in per_unit.items():
            red_ids = list(red)
            if len(red_ids) > 1:
                body += f"<h2>Interference reduction, {INTERFERENCE_UNITS[metric]} (1 - I(row) / I(column))</h2>" + \
                    html_table({b: {a: red[a].get(b) for a in red_ids} for b in red_ids}, red_ids, red_ids,
                               label="model", names=names).replace(BEST_MARK, "")
        body += f'<h2>Chart</h2><img src="{chart.name}" alt="chart">'
        out.write_text(html_page(title, body))
        return out
    lines = [f"# {title}", "", f"{BEST_MARK} marks the best value of each row; ↓ lower is better, ↑ higher.", "",
             markdown_table(table, ids, metrics, names=names), ""]
    for metric, red in per_unit.items():
        red_ids = list(red)
        if len(red_ids) < 2:
            continue
        lines += [f"## Interference reduction, {INTERFERENCE_UNITS[metric]}", "",
                  f"1 - {metric}(row) / {metric}(column): the share of the column's interference that the row "
                  "avoids (point values; `fusion reproduce` gives their bootstrap intervals).", "",
                  "| model | " + " | ".join(red_ids) + " |", "|---|" + "---|" * len(red_ids)]
        lines += [f"| {a} | " + " | ".join("-" if a == b or b not in red[a] else f"{red[a][b]:.1%}" for b in red_ids)
                  + " |" for a in red_ids]
        lines.append("")
    lines += ["## Models", "", "| column | strategy | seed | aliases | run |", "|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['strategy']} | {r.get('seed', '')} | {','.join(r.get('aliases', []))} | "
              f"{r.get('run_id') or ''} |" for r in rows]
    lines += ["", f"![chart]({chart.name})", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    out.write_text("\n".join(lines) + "\n")
    return out
