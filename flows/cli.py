"""The `fusion` command line: run, rerun, validate, verify, schema, export, compare, promote, reproduce,
schedule, schedules, serve."""
from __future__ import annotations

import json
import logging
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from fusion_core.config import STAGE_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fuse several source LLMs into one target LLM: a Prefect + MLflow + DeepSpeed pipeline.")
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("llm-fusion")
        except PackageNotFoundError:
            number = "unknown (the package is not installed)"
        typer.echo(f"fusion (llm-fusion) {number}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors"),
          _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                        help="print the version and exit")) -> None:
    _state["debug"] = debug


def _usage(message: str, what: str) -> None:
    """A usage error: reported with the usage line, exit 2 (no exception class, no traceback)."""
    raise typer.BadParameter(message, param_hint=what)


def _one_of(choices: tuple[str, ...]):
    """An option callback accepting one of `choices` (a usage error, exit 2, naming them, otherwise).
    Not an Enum type: typer's Enum errors read "Value error, ..."."""
    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(choices)}")
        return value

    return check


def _fail(exc: BaseException, code: int = 1) -> None:
    if _state["debug"]:
        traceback.print_exception(exc)
    from fusion_core.config import ConfigError

    from fusion_core.redaction import redact

    if isinstance(exc, ConfigError):
        typer.echo(redact(str(exc)), err=True)
    else:
        msg = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        from fusion_core.errors import FusionError

        prefix = "error" if isinstance(exc, FusionError) else f"error ({type(exc).__name__})"
        typer.echo(f"{prefix}: {msg}" + ("" if _state["debug"] else "  [--debug for the traceback]"), err=True)
    raise typer.Exit(code)


def _stdout_for(json_out: bool):
    """With --json, what libraries print while the pipeline runs (MLflow's "Successfully
    registered model ...") goes to stderr, so that stdout is the JSON alone."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()


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


TRACKING_URI_HELP = "the MLflow tracking URI to read (default: the config's tracking store)"

SET_HELP = ("override a config value, dotted.key=value (YAML value), repeatable: "
            "--set fusion.strategy=adaptive --set fusion.training.seed=1")


@app.command()
def validate(config: Path = typer.Argument(..., help="pipeline YAML"),
             overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Check a config: every problem is reported with its field path (exit 1 if any)."""
    cfg = _load(config, overrides=overrides)
    typer.echo(f"{config}: ok (pipeline {cfg.name!r}, {len(cfg.sources)} sources, strategy {cfg.fusion.strategy})")


@app.command()
def verify(config: Path = typer.Argument(..., help="pipeline YAML (for its workspace)"),
           full: bool = typer.Option(False, "--full", help="re-hash every file (default: files whose size, mtime, "
                                                          "ctime and inode are unchanged are taken from the hash "
                                                          "cache)")) -> None:
    """Check every completed stage output of the config's workspace against its manifest: a line per
    output, exit 0 when all hold, 1 naming each broken file."""
    cfg = _load(config, check_paths=False)
    from fusion_core.workspace import verify_workspace

    try:
        results = verify_workspace(cfg.workspace.root, full=full)
    except Exception as exc:
        _fail(exc)
    for stage, key, ok, why in results:
        typer.echo(f"{stage} {key}: " + ("ok" if ok else f"BROKEN: {why} "
                                         f"({cfg.workspace.root / 'stages' / stage / key})"))
    broken = sum(not ok for *_, ok, _ in results)
    how = "re-hashed" if full else "checked (sizes; checksums from the hash cache where files are unchanged)"
    typer.echo(f"{len(results)} stage output(s) in {cfg.workspace.root} {how}: "
               + (f"{broken} broken" if broken else "all hold"), err=bool(broken))
    if broken:
        raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of a pipeline config (for editor completion)."""
    from fusion_core.config import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def run(config: Path = typer.Argument(..., help="pipeline YAML"),
        from_stage: Optional[str] = typer.Option(None, "--from", metavar="STAGE", callback=_one_of(STAGE_NAMES),
                                                 help="recompute this stage and the ones after it; STAGE is one "
                                                      "of: " + ", ".join(STAGE_NAMES)),
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
        with _stdout_for(json_out):
            summary = run_pipeline(write_resolved_config(cfg) if overrides else config, from_stage)
    except Exception as exc:
        _fail(exc)
    _show(summary, json_out)


def _show(summary: dict, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


@app.command()
def rerun(run_id: str = typer.Argument(..., help="the MLflow run id of a failed or interrupted pipeline run"),
          config: Optional[Path] = typer.Argument(None, help="a pipeline YAML naming the tracking store "
                                                             "(default configs/demo.yaml)"),
          tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
          json_out: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """Finish a failed or interrupted pipeline run: its config again, completed stages reused,
    training resumed from its last checkpoint; the new run is linked to the old one."""
    cfg, uri = _tracking(config, tracking_uri)
    from flows.rerun import prepare_rerun

    try:
        resolved = prepare_rerun(uri, run_id, cfg.workspace.root / "configs")
        rerun_cfg = _load(resolved)
        from flows.env import apply_defaults

        apply_defaults(rerun_cfg.workspace.root)
        from flows.pipeline import run_pipeline

        if not _state["debug"]:
            _quiet_tracebacks()
        with _stdout_for(json_out):
            summary = run_pipeline(resolved, rerun_of=run_id)
    except Exception as exc:
        _fail(exc)
    _show(summary, json_out)
    if not json_out:
        typer.echo(f"rerun of {run_id}: MLflow run {summary['run_id']}")


@app.command()
def schedule(config: Path = typer.Argument(..., help="pipeline YAML"),
             cron: Optional[str] = typer.Option(None, "--cron", help='a cron string: "0 3 * * *" (03:00 daily)'),
             interval: Optional[float] = typer.Option(None, "--interval", help="seconds between runs"),
             timezone: Optional[str] = typer.Option(None, "--timezone", help="for --cron, e.g. Europe/Berlin"),
             name: Optional[str] = typer.Option(None, "--name", help="deployment name (default: the pipeline's)"),
             work_pool: Optional[str] = typer.Option(None, "--work-pool", help="run on this Prefect work pool's "
                                                                               "workers (default: `fusion serve`)"),
             overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Schedule the pipeline: a Prefect deployment on the server, run by `fusion serve` or a work pool."""
    cfg = _load(config, overrides=overrides)
    from flows.env import apply_defaults

    apply_defaults(cfg.workspace.root)
    from flows.pipeline import write_resolved_config
    from flows.schedule import ScheduleSpec, create_schedule

    try:
        spec = ScheduleSpec(cron=cron, interval_seconds=interval, timezone=timezone)
        spec.prefect_schedule()  # a bad cron string is refused before anything is written
        created = create_schedule(write_resolved_config(cfg), name or cfg.name, spec, work_pool=work_pool)
    except Exception as exc:
        _fail(exc)
    runner = f"workers of work pool {work_pool!r}" if work_pool else "`fusion serve`"
    typer.echo(f"scheduled {created['name']} ({created['schedule']}), run by {runner}; deployment {created['id']}")


@app.command()
def schedules(config: Optional[Path] = typer.Argument(None, help="a pipeline YAML (for its workspace)"),
              json_out: bool = typer.Option(False, "--json", help="print the list as JSON")) -> None:
    """List the scheduled pipelines on the Prefect server, with their next run."""
    if config is not None:
        from flows.env import apply_defaults

        apply_defaults(_load(config, check_paths=False).workspace.root)
    from flows.schedule import list_schedules

    try:
        rows = list_schedules()
    except Exception as exc:
        _fail(exc)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} scheduled pipeline(s)")
    for col in ("deployment", "schedule", "active", "runs on", "next run", "config"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["schedules"]) or "-", "yes" if r["active"] else "no", r["runs_on"],
                      r["next_run"] or "-", r["config"] or "-")
    Console(width=160).print(table)


@app.command()
def serve(config: Optional[Path] = typer.Argument(None, help="a pipeline YAML (for its workspace)"),
          limit: Optional[int] = typer.Option(None, "--limit", help="pipeline runs at once")) -> None:
    """Run the scheduled pipelines (those without a work pool) as they come due, until interrupted."""
    if config is not None:
        from flows.env import apply_defaults

        apply_defaults(_load(config, check_paths=False).workspace.root)
    from flows.schedule import serve_schedules

    try:
        serve_schedules(limit=limit)
    except Exception as exc:
        _fail(exc)


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
    shown = (".acc", ".acc_norm", ".exact_match.", ".bits_per_byte", ".perplexity", "humaneval.pass_at_1")
    for k, v in sorted(s["metrics"].items()):
        if any(part in k for part in shown) and "stderr" not in k and not k.startswith("interference."):
            metrics.add_row(k, f"{v:.4f}")
    m = s["metrics"]
    for unit, words, scale in (("bpb", "bits per byte, mean relative drop", 1.0),
                               ("acc", "accuracy, mean drop in points", 100.0)):
        name = f"interference.{unit}"
        if name in m:
            interval = (f" [{m[name + '.lo'] * scale:.4g}, {m[name + '.hi'] * scale:.4g}]"
                        if name + ".lo" in m and name + ".hi" in m else "")
            metrics.add_row(f"interference, {words} (vs the best of the reference set per task)",
                            f"{m[name] * scale:.4g}{interval} ({m.get(name + '.tasks_hurt', 0):.0f} of "
                            f"{m.get(name + '.tasks', 0):.0f} tasks hurt)")
    console.print(metrics)
    if s.get("report"):
        console.print(f"Evaluation report: {s['report'].get('markdown')}")
    console.print(f"MLflow tracking URI: {s['tracking_uri']}  (experiment {s['experiment']!r}, run {s['run_id']})")
    console.print(f"Registered model: {s['registered_model']} version {s['version']} (alias candidate)")
    if s.get("model_dir"):
        console.print(f"Trained model: {s['model_dir']}", soft_wrap=True)  # whole lines: to be copied
        console.print(f"  as a folder plain transformers loads, with its model card: "
                      f"fusion export {s['run_id']} --out DIR", soft_wrap=True)


@app.command()
def export(reference: str = typer.Argument(..., metavar="REFERENCE",
                                           help="a pipeline run id (the summary's run), MODEL/VERSION "
                                                "(fused-target/3) or MODEL@ALIAS (fused-target@candidate)"),
           config: Optional[Path] = typer.Argument(None, help="a pipeline YAML naming the tracking store and the "
                                                              "workspace (default configs/demo.yaml)"),
           out: Path = typer.Option(..., "--out", help="the folder to write: new or empty"),
           force: bool = typer.Option(False, "--force", help="replace --out when it is not empty"),
           tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP)) -> None:
    """Write a trained model as a Hugging Face folder that plain transformers loads: its tokenizer adds
    the start token the model was trained with, README.md is its model card."""
    cfg, uri = _tracking(config, tracking_uri)
    from flows.export import export_model

    try:
        with _stdout_for(True):  # MLflow's download bars and messages: stderr
            done = export_model(reference, out, tracking_uri=uri, workspace=cfg.workspace.root, force=force)
    except Exception as exc:
        _fail(exc)
    run = f", run {done.run_id}" if done.run_id else ""
    typer.echo(f"exported {done.name} version {done.version}{run} to {done.out} (weights from {done.weights_from})")
    typer.echo(f"load it: AutoModelForCausalLM.from_pretrained({str(done.out)!r}), "
               f"AutoTokenizer.from_pretrained({str(done.out)!r}); the card: {done.out / 'README.md'}")


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    html = "html"


def _tracking(config: Optional[Path], tracking_uri: Optional[str]):
    """The config (default configs/demo.yaml) and the tracking URI to read from."""
    from flows.env import apply_defaults

    if config is None:
        default = Path("configs/demo.yaml")
        if not default.is_file():
            _usage("give a config (or --tracking-uri and --model): there is no configs/demo.yaml here", "CONFIG")
        config = default
    cfg = _load(config, check_paths=False)
    apply_defaults(cfg.workspace.root)
    from fusion_core.redaction import remember_uri
    from tasks.tracking import tracking_uri as cfg_uri

    remember_uri(tracking_uri)  # a config written with it masked (a rerun's) connects with it
    return cfg, tracking_uri or cfg_uri(cfg)


@app.command()
def compare(config: Optional[Path] = typer.Argument(None, help="pipeline YAML (for its tracking URI and model name)"),
            model: Optional[str] = typer.Option(None, "--model", help="registered model name"),
            tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
            versions: Optional[list[int]] = typer.Option(None, "--version", help="versions to compare (repeatable; "
                                                                                 "default: all)"),
            last: Optional[int] = typer.Option(None, "--last", help="only the newest N versions or runs"),
            runs: bool = typer.Option(False, "--runs", help="compare the experiment's pipeline runs instead of "
                                                            "registered versions"),
            fmt: str = typer.Option("table", "--format", metavar="FORMAT",
                                    callback=_one_of(tuple(f.value for f in Format)),
                                    help="table (the terminal), json, or a report file (--out): markdown or html"),
            out: Optional[Path] = typer.Option(None, "--out", help="report file for markdown/html (default: "
                                                                    "<workspace>/reports/compare-<time>.md|.html)"),
            metric: Optional[list[str]] = typer.Option(
                None, "--metric", help="rows: metrics containing this text (repeatable); default: every score "
                                       "all compared models share"),
            headline: bool = typer.Option(False, "--headline", help="only held-out bits per byte, acc_norm, "
                                                                    "exact match, pass@1 and interference")) -> None:
    """Registered versions (or pipeline runs) side by side: a row per shared metric, the best marked."""
    import time

    fmt = Format(fmt)

    cfg, uri = _tracking(config, tracking_uri)
    from flows.compare import list_runs, list_versions, render_terminal, select_metrics, write_report

    try:
        if runs:
            rows = list_runs(uri, cfg.tracking.experiment, limit=last or 20)
        else:
            rows = list_versions(uri, model or cfg.tracking.registered_model, versions)
            rows = rows[-last:] if last else rows
    except Exception as exc:
        _fail(exc)
    if not rows:
        from fusion_core.errors import FusionError

        _fail(FusionError("nothing to compare"))
    chosen = select_metrics(rows, metric, headline_only=headline)
    if fmt == Format.json:
        typer.echo(json.dumps({"metrics": chosen, "rows": rows}, indent=2))
        return
    if fmt == Format.table:
        render_terminal(rows, chosen)
        return
    suffix = ".md" if fmt == Format.markdown else ".html"
    path = out or cfg.workspace.root / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    what = f"runs of {cfg.tracking.experiment}" if runs else f"versions of {model or cfg.tracking.registered_model}"
    written = write_report(rows, chosen, path, fmt.value, title=f"Comparison: {what}")
    typer.echo(f"report: {written} (chart {written.with_suffix('.png')})")


@app.command()
def promote(config: Path = typer.Argument(..., help="pipeline YAML: its evaluation section says what earns "
                                                    "promotion (primary_metric, primary_goal, interference_budget, "
                                                    "promotion_min_delta)"),
            version: Optional[str] = typer.Option(None, "--version", help="default: the version with alias candidate"),
            model: Optional[str] = typer.Option(None, "--model", help="registered model name"),
            tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help=TRACKING_URI_HELP),
            dry_run: bool = typer.Option(False, "--dry-run", help="say what would happen, change nothing"),
            overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Move alias `champion` to a version if it beats the champion within the interference budget.

    Exit 0: promoted (or would be, with --dry-run); 3: not promoted, with the reason."""
    cfg = _load(config, check_paths=False, overrides=overrides)
    from flows.env import apply_defaults

    apply_defaults(cfg.workspace.root)
    from flows.promote import promote as do_promote
    from tasks.tracking import tracking_uri as cfg_uri

    try:
        res = do_promote(tracking_uri or cfg_uri(cfg), model or cfg.tracking.registered_model, cfg.evaluation,
                         version=version, dry_run=dry_run)
    except Exception as exc:
        _fail(exc)
    verdict = ("promoted" if res.applied else "would be promoted") if res.decision.promote else "not promoted"
    typer.echo(f"{res.name} version {res.version}: {verdict} (champion before: "
               f"{'v' + res.champion_before if res.champion_before else 'none'})\n  {res.decision.reason}")
    if not res.decision.promote:
        raise typer.Exit(3)


@app.command()
def reproduce(config: Path = typer.Argument(..., help="pipeline YAML"),
              seeds: Optional[list[int]] = typer.Option(None, "--seed", help="training seeds (repeatable; default: "
                                                                             "the config's)"),
              variants: Optional[list[str]] = typer.Option(
                  None, "--variant", help="repeatable; default: clm, single:<each source>, min_ce, avg_ce, adaptive, "
                                          "reference. Also adaptive:kd, and +dotted.key=value suffixes"),
              json_out: bool = typer.Option(False, "--json", help="print the comparison as JSON"),
              overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Run the strategy sweep sharing stages 1-3, then write the comparison with interference."""
    cfg = _load(config, overrides=overrides)
    from flows.env import apply_defaults

    apply_defaults(cfg.workspace.root)
    try:
        from flows.reproduce import default_variants, fusion_reproduce, plan

        # Every run's config is checked (and bad variants refused) before anything runs.
        plan(config, list(variants or []) or default_variants(cfg), list(seeds or [cfg.fusion.training.seed]),
             list(overrides or []))
        if not _state["debug"]:
            _quiet_tracebacks()
        with _stdout_for(json_out):
            result = fusion_reproduce(str(config.resolve()), seeds=list(seeds or []) or None,
                                      variants=list(variants or []) or None, overrides=list(overrides or []))
    except Exception as exc:
        _fail(exc)
    _show_report(result, json_out)


def _show_report(result: dict, json_out: bool) -> None:
    """A sweep's or study's outcome: its JSON, or its markdown report and where it lies."""
    if json_out:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(Path(result["report"]).read_text()))
    typer.echo(f"report: {result['report']}  ({result['seconds'] / 60:.1f} min; MLflow run {result['run_id']})")


@app.command()
def study(config: Path = typer.Argument(..., help="pipeline YAML"),
          seeds: Optional[list[int]] = typer.Option(None, "--seed", help="seeds of the final runs (repeatable; "
                                                                         "default 0 1 2 3 4); the first also tunes"),
          variants: Optional[list[str]] = typer.Option(
              None, "--variant", help="repeatable; default: clm, single:<each source>, min_ce, avg_ce, uniform, "
                                      "adaptive, adaptive:kd, adaptive:confidence"),
          tune: str = typer.Option("fusion.training.learning_rate=1e-3,3e-3", "--tune",
                                   help="the tuning grid every variant gets on validation: dotted.key=v1,v2,... "
                                        "(none: no tuning)"),
          resamples: int = typer.Option(1000, "--resamples", min=100, help="bootstrap resamples of every interval"),
          json_out: bool = typer.Option(False, "--json", help="print the analysis as JSON"),
          overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Does adaptive selection beat FuseLLM? Tune every strategy alike on validation, run each at its best
    setting for every seed, report on test with intervals, paired differences and routing; resumable."""
    cfg = _load(config, overrides=overrides)
    from flows.env import apply_defaults

    apply_defaults(cfg.workspace.root)
    try:
        from flows.study import default_variants, fusion_study, parse_tuning, plan_run

        grid = parse_tuning(tune)
        chosen = list(variants or []) or default_variants(cfg)
        for v in chosen:   # every variant's configs are checked before anything runs
            for i in range(len(grid)):
                plan_run(config, list(overrides or []), "tune", v, (seeds or [0])[0], i, grid)
        if not _state["debug"]:
            _quiet_tracebacks()
        with _stdout_for(json_out):
            result = fusion_study(str(config.resolve()), seeds=list(seeds or []) or None,
                                  variants=list(variants or []) or None, tune=tune, overrides=list(overrides or []),
                                  resamples=resamples)
    except Exception as exc:
        _fail(exc)
    _show_report(result, json_out)


server_app = typer.Typer(no_args_is_help=True, help="The workspace's Prefect server and MLflow tracking server, "
                                                    "in the background: `fusion run` then tracks to them.")
app.add_typer(server_app, name="server")
CONFIG_FOR_WORKSPACE = "a pipeline YAML (its workspace holds the servers' state; default configs/demo.yaml)"


def _server_workspace(config: Optional[Path]) -> Path:
    if config is None:
        config = Path("configs/demo.yaml")
        if not config.is_file():
            _usage("give a config: the servers belong to its workspace (there is no configs/demo.yaml here)",
                   "CONFIG")
    return _load(config, check_paths=False).workspace.root


@server_app.command("start")
def server_start(config: Optional[Path] = typer.Argument(None, help=CONFIG_FOR_WORKSPACE),
                 prefect_port: int = typer.Option(4200, "--prefect-port", help="the Prefect server's port"),
                 mlflow_port: int = typer.Option(5000, "--mlflow-port", help="the MLflow server's port"),
                 database_url: Optional[str] = typer.Option(
                     None, "--database-url", envvar="FUSION_DATABASE_URL",
                     help="postgresql://USER:PASSWORD@HOST:PORT\\[/NAME]: keep the state in PostgreSQL, databases "
                          "prefect and mlflow (NAME_prefect, NAME_mlflow), which must exist; default: the "
                          "workspace's SQLite files")) -> None:
    """Start the Prefect server (UI and API) and the MLflow tracking server on 127.0.0.1."""
    workspace = _server_workspace(config)
    from flows.servers import start_servers

    try:
        state = start_servers(workspace, prefect_port=prefect_port, mlflow_port=mlflow_port,
                              database_url=database_url)
    except Exception as exc:
        _fail(exc)
    typer.echo(f"Prefect: {state.prefect.url} (API {state.prefect_api_url}), pid {state.prefect.pid}")
    typer.echo(f"MLflow:  {state.mlflow.url}, pid {state.mlflow.pid}")
    typer.echo(f"state: {state.database_url or 'the workspace SQLite files'}; logs: {workspace / 'servers'}")
    typer.echo("`fusion run` with this workspace now uses them; `fusion server stop` stops them")


@server_app.command("status")
def server_status_cmd(config: Optional[Path] = typer.Argument(None, help=CONFIG_FOR_WORKSPACE),
                      json_out: bool = typer.Option(False, "--json", help="print the status as JSON")) -> None:
    """Say whether the workspace's servers run (exit 0), or are partly down or stopped (exit 3)."""
    from flows.servers import server_status

    status = server_status(_server_workspace(config))
    if json_out:
        typer.echo(json.dumps(status, indent=2))
    else:
        for name in ("prefect", "mlflow"):
            s = status[name]
            typer.echo(f"{name}: {s['state']}" + (f" at {s['url']} (pid {s['pid']})" if s["url"] else ""))
        if status["database_url"]:
            typer.echo(f"database: {status['database_url']}")
    if not all(status[name]["state"] == "running" for name in ("prefect", "mlflow")):
        raise typer.Exit(3)


@server_app.command("stop")
def server_stop(config: Optional[Path] = typer.Argument(None, help=CONFIG_FOR_WORKSPACE)) -> None:
    """Stop the workspace's servers (SIGTERM, SIGKILL after 15 s); nothing running is no error."""
    from flows.servers import stop_servers

    stopped = stop_servers(_server_workspace(config))
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "no servers were running")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
