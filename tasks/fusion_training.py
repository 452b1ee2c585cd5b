"""Stage 4, fusion_training: DeepSpeed training of the target on lambda*CLM + (1-lambda)*KD."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.teacher import load_fusion_examples
from fusion_core.training import TrainingResult, train_target
from tasks.common import TokenProgress, run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key
from tasks.tracking import clean_metrics


def torchrun_command(training, job_path: Path | str) -> list[str]:
    """The command (torchrun as `python -m torch.distributed.run` of this interpreter) that starts this
    machine's `training.processes` ranks of fusion_core.train_launch on `job_path`: a standalone
    rendezvous on one node; with nnodes > 1, node `node_rank` of a static rendezvous at rdzv_endpoint.

    Static, not c10d: torchrun's c10d rendezvous ignores --node_rank and numbers the nodes by host
    name, while global rank 0, which writes the model, the history and the result, must be on node 0.
    """
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if training.nnodes > 1:
        cmd += [f"--nnodes={training.nnodes}", f"--node_rank={training.node_rank}", "--rdzv_backend=static",
                f"--rdzv_endpoint={training.rdzv_endpoint}"]
    else:
        cmd.append("--standalone")
    return cmd + [f"--nproc_per_node={training.processes}", "-m", "fusion_core.train_launch", str(job_path)]


def _launch(fusion, train: Path, target: Path, teachers: list[Path], names: list[str], work: Path, log,
            logger) -> TrainingResult:
    """Train with `fusion.training.processes` ranks on this machine under torchrun (fusion_core.train_launch),
    alone or as node `node_rank` of `nnodes`, forwarding rank 0's logged steps to `log` while it runs.

    Returns the TrainingResult on node 0 (which holds global rank 0). Raises FusionError on another
    node once its ranks have finished (the model, its metrics and the rest of the pipeline are node
    0's), RuntimeError with the ranks' last output when they fail."""
    import os
    import subprocess
    import tempfile
    import time

    from fusion_core.errors import FusionError
    from fusion_core.workspace import write_json_atomic

    training = fusion.training
    n, nodes, node = training.processes, training.nnodes, training.node_rank
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="launch-", dir=work))
    job = {"fusion": fusion.model_dump(mode="json"), "train": str(train), "target": str(target),
           "teachers": [str(t) for t in teachers], "sources": names, "out_dir": str(work),
           "history": str(run_dir / "history.jsonl"), "result": str(run_dir / "result.json")}
    write_json_atomic(run_dir / "job.json", job)
    threads = training.threads or max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = torchrun_command(training, run_dir / "job.json")
    if nodes == 1:
        where = f"{n} processes"
        logger.info(f"training with {n} processes ({threads} threads each): {' '.join(cmd)}")
    else:
        where = f"node {node} of {nodes}, {n} processes here"
        logger.info(f"training as node {node} of {nodes} ({n} processes here, {threads} threads each), rendezvous "
                    f"at {training.rdzv_endpoint}: {' '.join(cmd)}")
        if node == 0:
            other = [("--node_rank=K" if c.startswith("--node_rank=") else c) for c in cmd]
            logger.info(f"waiting for nodes 1 .. {nodes - 1}: each runs this pipeline with --set "
                        f"fusion.training.node_rank=K, or: {' '.join(other)}")
    output = run_dir / "ranks.log"
    seen = 0
    with output.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(work))

        def forward() -> None:
            nonlocal seen
            history = run_dir / "history.jsonl"
            if not history.is_file():
                return
            lines = history.read_text().splitlines()
            for line in lines[seen:]:
                if line.endswith("}"):
                    entry = json.loads(line)
                    log(entry["metrics"], entry["step"])
                    seen += 1

        while proc.poll() is None:
            time.sleep(2)
            forward()
        forward()
    if proc.returncode != 0:
        tail = "\n".join(output.read_text().splitlines()[-25:])
        raise RuntimeError(f"fusion training ({where}) failed (exit {proc.returncode}); the ranks' last "
                           f"output ({output}):\n{tail}")
    if node != 0:
        raise FusionError(f"fusion.training.node_rank {node}: this node's {n} rank(s) finished their part of the "
                          f"training; node 0 holds global rank 0, which wrote the model, and runs the rest of the "
                          f"pipeline (evaluate, register): nothing more to do on this node")
    r = json.loads((run_dir / "result.json").read_text())
    return TrainingResult(model_dir=Path(r["model_dir"]), steps=r["steps"], tokens_seen=r["tokens_seen"],
                          metrics=r["metrics"], wall_time_s=r["wall_time_s"],
                          resumed_from_step=r["resumed_from_step"])


def training_section(fusion) -> dict:
    """The fusion config as it matters to the trained model: options of other strategies left out,
    so that (say) tuning the adaptive selector does not invalidate a trained min_ce model."""
    exclude = set()
    if fusion.strategy not in ("adaptive", "reference"):
        exclude.add("adaptive")
    if fusion.strategy != "single":
        exclude.add("single_source")
    return fusion.model_dump(mode="json", exclude=exclude)


def selector_usage_plot(history: list[tuple[int, dict[str, float]]], sources: list[str], path: Path, *,
                        title: str) -> None:
    """PNG of each source's selection share and mean weight over the logged training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for name in sources:
        top.plot(steps, [m.get(f"select.{name}", float("nan")) for _, m in history], label=name)
        bottom.plot(steps, [m.get(f"weight.{name}", float("nan")) for _, m in history], label=name)
    top.set_ylabel("share of sequences\nselecting the source")
    bottom.set_ylabel("mean weight")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    top.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_key(ctx: RunContext, teacher_key: str) -> str:
    """The fusion_training stage key of `ctx`'s config: the trained model's identity."""
    return stage_key("fusion_training", training_section(ctx.config.fusion), teacher_key, ctx.target.key,
                     [s.name for s in ctx.sources])


@task(name="fusion_training", cache_policy=NO_CACHE, persist_result=False)
def fusion_training(ctx: RunContext, data: StageResult, teacher: StageResult, reference: str | None = None
                    ) -> StageResult:
    """Train the target (or, with `reference`, a reference model of the evaluation: `clm`,
    `single:<source>`, whose config `ctx` then holds)."""
    cfg = ctx.config
    key = training_key(ctx, teacher.key)
    logger = run_logger()

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        import mlflow

        uses_teachers = cfg.fusion.strategy != "clm"
        names = [s.name for s in ctx.sources] if uses_teachers else []
        teacher_folders = [teacher.path / n for n in names]
        examples = []
        if not cfg.fusion.training.torchrun:  # else every rank reads them itself
            examples = load_fusion_examples(data.path / "train.jsonl", ctx.target.path, teacher_folders)
        # Checkpoints live outside the stage's temporary folder so a killed run can resume.
        work = cfg.workspace.root / "work" / "fusion_training" / key

        history: list[tuple[int, dict[str, float]]] = []
        progress = TokenProgress(f"fusion_training ({cfg.fusion.strategy})", cfg.fusion.training.steps, logger,
                                 unit="steps")

        def log(metrics: dict[str, float], step: int) -> None:
            progress.advance(step - progress.done)
            history.append((step, dict(metrics)))
            mlflow.log_metrics(clean_metrics(metrics), step=step)
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())
                                                     if k in ("loss", "clm", "kd", "feedback", "selector_nll", "lr",
                                                              "tokens_per_s") or k.startswith("weight.")))

        try:
            if cfg.fusion.training.torchrun:
                result = _launch(cfg.fusion, data.path / "train.jsonl", ctx.target.path, teacher_folders, names, work,
                                 log, logger)
            else:
                result = train_target(ctx.target.path, examples, fusion=cfg.fusion, out_dir=work, source_names=names,
                                      log=log)
        finally:
            progress.close()
        shutil.copytree(result.model_dir, tmp / "model")
        if names and history:
            plot = tmp / "selector_usage.png"
            selector_usage_plot(history, names, plot, title=f"{cfg.name}: {cfg.fusion.strategy}")
            mlflow.log_artifact(str(plot), artifact_path="plots")
        meta["training"] = {"steps": result.steps, "tokens_seen": result.tokens_seen}
        resumed = {"resumed_from_step": result.resumed_from_step} if result.resumed_from_step else {}
        return {**result.metrics, "steps": result.steps, "tokens_seen": result.tokens_seen,
                "train_seconds": result.seconds, **resumed}

    # The nodes of a multi-node training build the same key at once (node 0 writes the output,
    # the others stop with their message): each node has its own lock.
    nodes = cfg.fusion.training.nnodes
    return run_stage(ctx, "fusion_training", key, cfg.fusion, build, logger,
                     tags={"reference": reference} if reference else None,
                     run_name=f"fusion_training [{reference}]" if reference else None,
                     lock_name=f"{key}.node{cfg.fusion.training.node_rank}" if nodes > 1 else "")
