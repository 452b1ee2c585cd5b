"""The `fusion` command line: run, validate, schema, compare."""
from __future__ import annotations

import json
import logging
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fuse several source LLMs into one target LLM: a Prefect + MLflow + DeepSpeed pipeline.")
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors")) -> None:
    _state["debug"] = debug


def _fail(exc: BaseException, code: int = 1) -> None:
    if _state["debug"]:
        traceback.print_exception(exc)
    from fusion_core.config import ConfigError

    if isinstance(exc, ConfigError):
        typer.echo(str(exc), err=True)
    else:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        from fusion_core.errors import FusionError

        prefix = "error" if isinstance(exc, FusionError) else f"error ({type(exc).__name__})"
        typer.echo(f"{prefix}: {msg}" + ("" if _state["debug"] else "  [--debug for the traceback]"), err=True)
    raise typer.Exit(code)


class _NoTraceback(logging.Filter):
    """Keep Prefect's failure log lines but drop their tracebacks (shown with --debug only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def _quiet_tracebacks() -> None:
    names = ["prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTraceback())


def _load(config: Path, check_paths: bool = True, overrides: Optional[list[str]] = None):
    from fusion_core.config import ConfigError, load_config

    try:
        return load_config(config, check_paths=check_paths, overrides=overrides or ())
    except ConfigError as exc:
        _fail(exc)


SET_HELP = ("override a config value, dotted.key=value (YAML value), repeatable: "
            "--set fusion.strategy=adaptive --set fusion.training.seed=1")


@app.command()
def validate(config: Path = typer.Argument(..., help="pipeline YAML"),
             overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Check a config: every problem is reported with its field path (exit 1 if any)."""
    cfg = _load(config, overrides=overrides)
    typer.echo(f"{config}: ok (pipeline {cfg.name!r}, {len(cfg.sources)} sources, strategy {cfg.fusion.strategy})")


@app.command()
def schema() -> None:
    """Print the JSON Schema of a pipeline config (for editor completion)."""
    from fusion_core.config import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def run(config: Path = typer.Argument(..., help="pipeline YAML"),
        from_stage: Optional[str] = typer.Option(None, "--from", help="recompute this stage and the ones after it"),
        json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
        overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Run the pipeline; completed stages are reused."""
    cfg = _load(config, overrides=overrides)
    from flows.env import apply_defaults

    apply_defaults(cfg.workspace.root)
    try:
        from flows.pipeline import run_pipeline, write_resolved_config

        if not _state["debug"]:
            _quiet_tracebacks()
        # With overrides, the flow runs the resolved config (absolute paths), kept in the workspace.
        summary = run_pipeline(write_resolved_config(cfg) if overrides else config, from_stage)
    except Exception as exc:
        _fail(exc)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"pipeline {s['pipeline']}: {s['seconds']:.0f} s")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for name, st in s["stages"].items():
        table.add_row(name, "reused" if st["reused"] else "computed", f"{st['seconds']:.1f}")
    console.print(table)
    metrics = Table(title="evaluation")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    shown = (".acc", ".acc_norm", ".exact_match.", ".bits_per_byte", ".perplexity")
    for k, v in sorted(s["metrics"].items()):
        if any(part in k for part in shown) and "stderr" not in k:
            metrics.add_row(k, f"{v:.4f}")
    console.print(metrics)
    console.print(f"MLflow tracking URI: {s['tracking_uri']}  (experiment {s['experiment']!r}, run {s['run_id']})")
    console.print(f"Registered model: {s['registered_model']} version {s['version']} (alias candidate)")


class Format(str, Enum):
    table = "table"
    json = "json"


@app.command()
def compare(config: Optional[Path] = typer.Argument(None, help="pipeline YAML (for its tracking URI and model name)"),
            model: Optional[str] = typer.Option(None, "--model", help="registered model name"),
            tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
            fmt: Format = typer.Option(Format.table, "--format"),
            metric: Optional[list[str]] = typer.Option(
                None, "--metric", help="columns: metrics containing this text (repeatable); default: held-out "
                                       "bits per byte per domain, acc_norm and strict exact match")) -> None:
    """List registered model versions side by side (one row each) with their key metrics."""
    from flows.env import apply_defaults

    if config is None:
        default = Path("configs/demo.yaml")
        if not default.is_file():
            _fail(ValueError("give a config (or --tracking-uri and --model)"))
        config = default
    cfg = _load(config, check_paths=False)
    apply_defaults(cfg.workspace.root)
    from flows.compare import list_versions
    from tasks.tracking import tracking_uri as cfg_uri

    try:
        rows = list_versions(tracking_uri or cfg_uri(cfg), model or cfg.tracking.registered_model)
    except Exception as exc:
        _fail(exc)
    if fmt == Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from flows.compare import render_table

    render_table(rows, metric)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
