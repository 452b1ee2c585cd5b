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


def render_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = sorted({k for r in rows for k in r["metrics"]})
    table = Table(title=f"registered versions of {rows[0]['name']}" if rows else "no versions")
    table.add_column("metric")
    for r in rows:
        label = f"v{r['version']}" + (f" ({','.join(r['aliases'])})" if r["aliases"] else "")
        table.add_column(f"{label}\n{r['tags'].get('strategy', '')}", justify="right")
    for m in names:
        table.add_row(m, *[f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for r in rows])
    Console().print(table)
