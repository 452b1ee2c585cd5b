"""Registered model versions side by side, with the metrics of the run that registered them."""
from __future__ import annotations

from fusion_core.errors import FusionError


def list_versions(tracking_uri: str, name: str) -> list[dict]:
    """Every version of registered model `name`: aliases, tags and the evaluation metrics.

    Raises FusionError when no such registered model exists.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise FusionError(f"no registered model {name!r} at {tracking_uri}") from None
    rows = []
    for found in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        mv = client.get_model_version(name, found.version)  # search results carry no aliases
        metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        rows.append({
            "name": name, "version": str(mv.version), "aliases": sorted(mv.aliases or []),
            "run_id": mv.run_id, "created": mv.creation_timestamp, "tags": dict(mv.tags or {}),
            "metrics": {k: v for k, v in sorted(metrics.items())
                        if k.startswith(("eval.", "ppl.")) and "_stderr" not in k},
        })
    return rows


HEADLINE = (".bits_per_byte", ".acc_norm", ".exact_match.strict-match")


def short_name(metric: str) -> str:
    """ppl.code.bits_per_byte -> code bpb; eval.fusion_code_mc.acc_norm -> fusion_code_mc acc_n."""
    name = metric.removeprefix("ppl.").removeprefix("eval.")
    return (name.replace(".bits_per_byte", " bpb").replace(".acc_norm", " acc_n")
            .replace(".exact_match.strict-match", " em").replace(".perplexity", " ppl"))


def render_table(rows: list[dict], metrics: list[str] | None = None) -> None:
    """One row per version (aliases, strategy, seed) and a column per metric: the headline ones
    (held-out bits per byte per domain, acc_norm, strict exact match), or those containing one of
    `metrics`."""
    from rich.console import Console
    from rich.table import Table

    names = sorted({k for r in rows for k in r["metrics"]})
    wanted = [m for m in names if any(part in m for part in (metrics or HEADLINE))]
    wanted.sort(key=lambda m: (not m.startswith("ppl."), m))
    table = Table(title=f"registered versions of {rows[0]['name']}" if rows else "no versions")
    for col in ("version", "aliases", "strategy", "seed"):
        table.add_column(col, no_wrap=True)
    for m in wanted:
        table.add_column(short_name(m), justify="right")
    for r in rows:
        tags = r["tags"]
        strategy = tags.get("strategy", "")
        if strategy == "single":
            strategy += f":{tags.get('single_source', '?')}"
        elif strategy == "adaptive":
            lr = tags.get("adaptive.learning_rate", "None")
            strategy += f":{tags.get('adaptive.objective', '?')}" + ("" if lr == "None" else f" lr {lr}")
        table.add_row(f"v{r['version']}", ",".join(r["aliases"]), strategy, tags.get("seed", ""),
                      *[f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in wanted])
    Console(width=max(100, 26 + 12 * (len(wanted) + 2))).print(table)
