"""Stage 3, teacher_inference: each source scores the training documents, shard by shard.

Each shard (`teacher.docs_per_shard` documents) is one Prefect task run (`teacher_shard`, mapped
over the shards that are not complete yet) on the task runner `teacher.task_runner` names, with
`teacher.workers` workers: threads of this process sharing one loaded model per source, worker
processes each loading the model once, or any Prefect task runner (Dask, Ray) that sends the
tasks elsewhere. A shard task gets only paths and plain values (`ShardJob`) and reads its own
documents and alignments from disk, so it runs the same wherever it runs, and memory is bounded
by the shard, not the corpus. Shards are written into a work folder outside the stage output
(`<workspace>/work/teacher_inference/<stage key>/<source>/`), each atomically with a sidecar
holding its checksum and statistics; a rerun after a crash or a kill scores only the shards that
are missing, interrupted or corrupt. When every shard of every source is complete they are
linked into the stage output, whose manifest is written last.
"""
from __future__ import annotations

import gc
import importlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE

from fusion_core.corpus_alignment import AlignmentFile
from fusion_core.data import DocumentFile
from fusion_core.errors import FusionError
from fusion_core.marginal import Marginalizer
from fusion_core.models import load_causal_lm, load_tokenizer, model_context_length, resolve_device
from fusion_core.teacher import (
    ShardSpec, ShardStats, aggregate_stats, plan_shards, read_shard_stats, score_shard, shard_state,
)
from fusion_core.tokenization import encode_document
from fusion_core.vocab import VocabularyMap
from tasks.common import TokenProgress, run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key


@dataclass(frozen=True)
class ShardJob:
    """What every shard task of one source needs, as paths and plain values (picklable)."""

    source: str
    model_path: str
    dtype: str
    allow_pickle: bool
    trust_remote_code: bool
    target_path: str
    docs_path: str
    alignment_path: str
    vocab_path: str
    folder: str
    fingerprint: str
    specs: tuple[ShardSpec, ...]
    top_k: int
    temperature: float
    batch_size: int
    device: str
    projection: str
    marginalize: bool

    @property
    def id(self) -> str:
        return f"{self.folder}@{self.fingerprint}"


@dataclass
class _Loaded:
    """A ShardJob's model, tokenizers and readers, loaded once per process."""

    model: Any
    src_tok: Any
    tgt_tok: Any
    docs: DocumentFile
    alignments: AlignmentFile
    vmap: VocabularyMap
    marginalizer: Marginalizer | None
    context_length: int | None


# Per-process state. Task functions reach it only through the functions below: Prefect
# cloudpickles a task's function (and the flow's) by value to send it to a worker process, and
# a module global it names directly (a lock, a model) would be pickled with it.
_LOADED: dict[str, _Loaded] = {}
_LOAD_LOCK = threading.Lock()
_PROGRESS: dict[str, TokenProgress] = {}  # per job, in the process that runs the stage


def _progress_of(job: ShardJob) -> TokenProgress | None:
    return _PROGRESS.get(job.id)


def _open_job(job: ShardJob, bar: TokenProgress, preload: bool) -> None:
    _PROGRESS[job.id] = bar
    if preload:
        _load(job)


def _close_job(job: ShardJob) -> None:
    _PROGRESS.pop(job.id, None)
    _LOADED.pop(job.id, None)
    gc.collect()


def _load(job: ShardJob) -> _Loaded:
    """The job's model and readers, loaded on this process's first shard of the job."""
    with _LOAD_LOCK:
        if job.id not in _LOADED:
            src_tok, tgt_tok = load_tokenizer(Path(job.model_path)), load_tokenizer(Path(job.target_path))
            _LOADED[job.id] = _Loaded(
                model=load_causal_lm(Path(job.model_path), dtype=job.dtype, device=job.device,
                                     allow_pickle=job.allow_pickle, trust_remote_code=job.trust_remote_code),
                src_tok=src_tok, tgt_tok=tgt_tok, docs=DocumentFile(Path(job.docs_path)),
                alignments=AlignmentFile(Path(job.alignment_path)), vmap=VocabularyMap.load(Path(job.vocab_path)),
                marginalizer=Marginalizer.build(src_tok, tgt_tok) if job.marginalize else None,
                context_length=model_context_length(Path(job.model_path)))
        return _LOADED[job.id]


def _set_torch_threads(threads: int) -> None:
    """A worker process's initializer: its share of the cores."""
    import torch

    torch.set_num_threads(threads)


@task(name="teacher_shard", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="{job.source}-{index:05d}")
def teacher_shard(job: ShardJob, index: int) -> dict:
    """Score one shard of one source (see the module doc); returns its statistics and this process's id."""
    loaded = _load(job)
    spec = job.specs[index]
    bar = _progress_of(job)  # present only in the stage's own process
    seen = [0]

    def progress(tokens: int, _docs: int) -> None:
        bar.advance(tokens - seen[0])
        seen[0] = tokens

    stats = score_shard(loaded.model, loaded.src_tok, loaded.tgt_tok, loaded.docs.slice(spec.start, spec.stop),
                        loaded.alignments, loaded.vmap.src_to_tgt, Path(job.folder), spec,
                        fingerprint=job.fingerprint, top_k=job.top_k, temperature=job.temperature,
                        batch_size=job.batch_size, device=job.device, marginalizer=loaded.marginalizer,
                        src_special=loaded.vmap.special_mask(), projection=job.projection, source_name=job.source,
                        context_length=loaded.context_length, progress=progress if bar is not None else None)
    return {"stats": stats.to_json(), "pid": os.getpid()}


def task_runner(tcfg):
    """The Prefect task runner `teacher.task_runner` names, built (not started)."""
    from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

    if tcfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=tcfg.workers)
    if tcfg.task_runner == "processes":
        threads = tcfg.threads or max(1, (os.cpu_count() or 1) // tcfg.workers)
        return ProcessPoolTaskRunner(max_workers=tcfg.workers, initializer=_set_torch_threads, initargs=(threads,))
    module, _, name = tcfg.task_runner.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise FusionError(f"teacher.task_runner: cannot import {tcfg.task_runner!r} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, TaskRunner)):
        raise FusionError(f"teacher.task_runner: {tcfg.task_runner!r} is not a Prefect TaskRunner class")
    try:
        return cls(**tcfg.task_runner_options)
    except TypeError as e:
        raise FusionError(f"teacher.task_runner_options do not fit {tcfg.task_runner!r}: {e}") from e


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@task(name="teacher_inference", cache_policy=NO_CACHE, persist_result=False)
def teacher_inference(ctx: RunContext, data: StageResult, alignment: StageResult) -> StageResult:
    cfg = ctx.config
    tcfg = cfg.teacher
    # How shards are scheduled does not change what is scored: not part of the key.
    key = stage_key("teacher_inference",
                    tcfg.model_dump(mode="json", exclude={"workers", "threads", "task_runner", "task_runner_options"}),
                    alignment.key, [m.key for m in ctx.sources])
    logger = run_logger()

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        import torch
        from prefect.futures import as_completed

        task_runner(tcfg)  # a runner that cannot be built fails here, before any model is loaded
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        docs = DocumentFile(data.path / "train.jsonl")  # read shard by shard: memory bounded by the shard
        tgt_tok = load_tokenizer(ctx.target.path)
        chars = docs.total_chars()
        device = resolve_device(tcfg.device)
        metrics: dict[str, float] = {}
        work = cfg.workspace.root / "work" / "teacher_inference" / key
        for src, src_cfg in zip(ctx.sources, cfg.sources):
            folder = work / src.name
            specs = plan_shards(len(docs), tcfg.docs_per_shard)
            states = {s.index: shard_state(folder, s, key) for s in specs}
            todo = [s for s in specs if not states[s.index][0]]
            bad = [f"{s.name} ({states[s.index][1]})" for s in todo if states[s.index][1] != "missing"]
            logger.info(f"{src.name}: {len(specs) - len(todo)} of {len(specs)} shards complete, "
                        f"{len(todo)} to score" + (f"; rescoring {', '.join(bad)}" if bad else ""))
            start = time.perf_counter()
            if todo:
                src_tok = load_tokenizer(src.path)
                job = ShardJob(
                    source=src.name, model_path=str(src.path), dtype=src_cfg.dtype,
                    allow_pickle=getattr(src_cfg.model, "allow_pickle", False),
                    trust_remote_code=getattr(src_cfg.model, "trust_remote_code", False),
                    target_path=str(ctx.target.path), docs_path=str(data.path / "train.jsonl"),
                    alignment_path=str(alignment.path / f"{src.name}.alignment.parquet"),
                    vocab_path=str(alignment.path / f"{src.name}.vocab.npz"), folder=str(folder), fingerprint=key,
                    specs=tuple(specs), top_k=tcfg.top_k, temperature=tcfg.temperature,
                    batch_size=tcfg.batch_size, device=device, projection=cfg.alignment.projection,
                    marginalize=cfg.alignment.marginalize or cfg.alignment.projection == "text")
                # Tokens to score, estimated from the characters left and a sample's tokens per character.
                sample = docs.sample(200)
                per_char = (sum(len(encode_document(src_tok, d.text)) for d in sample)
                            / max(sum(len(d.text) for d in sample), 1))
                bar = TokenProgress(src.name, int(per_char * chars * len(todo) / max(len(specs), 1)), logger)
                _open_job(job, bar, preload=tcfg.task_runner == "threads")  # threads share one model
                scoring_start = time.perf_counter()
                try:
                    with task_runner(tcfg) as runner:
                        futures = runner.map(teacher_shard, {"job": unmapped(job), "index": [s.index for s in todo]})
                        for f in as_completed(futures):
                            out = f.result()  # re-raises the first failure, naming source and document
                            if out["pid"] != os.getpid():  # scored elsewhere: progress by whole shards
                                bar.advance(ShardStats.from_json(out["stats"]).source_tokens)
                    scoring_seconds = time.perf_counter() - scoring_start
                finally:
                    bar.close()
                    _close_job(job)
            parts: list[ShardStats] = []
            (tmp / src.name).mkdir()
            for s in specs:
                ok, why = shard_state(folder, s, key)
                if not ok:
                    raise RuntimeError(f"{src.name}: {s.name} is not complete after scoring ({why})")
                parts.append(read_shard_stats(folder, s))
                _link_or_copy(folder / s.name, tmp / src.name / s.name)
            stats = aggregate_stats(parts, time.perf_counter() - start)
            m = stats.metrics()
            scored = [p for p, s in zip(parts, specs) if s in todo]
            m["scored_shards"] = float(len(scored))
            if scored:  # throughput of this run's scoring only: its wall time, whatever the workers
                m["tokens_per_s"] = sum(p.source_tokens for p in scored) / scoring_seconds if scoring_seconds else 0.0
                m["scoring_seconds"] = scoring_seconds
            else:
                m.pop("tokens_per_s", None)
            logger.info(f"{src.name}: {stats.source_tokens} tokens"
                        + (f" ({m['tokens_per_s']:.0f} tokens/s)" if "tokens_per_s" in m else "")
                        + f", {m['bytes_per_target_token']:.1f} bytes/target "
                        f"token, teacher distribution at {m.get('coverage', 0):.1%} of target positions; "
                        + ", ".join(f"perplexity {d} {m[f'perplexity.{d}']:.2f}" for d in stats.ce_by_domain))
            metrics.update({f"{src.name}.{k}": v for k, v in m.items()})
        meta["work_folder"] = str(work)
        return metrics

    def cleanup() -> None:  # still holding the key's lock: no other run is scoring into this folder
        shutil.rmtree(cfg.workspace.root / "work" / "teacher_inference" / key, ignore_errors=True)

    # The stage output holds the shards now (hard links): the work folder goes, after a build only.
    return run_stage(ctx, "teacher_inference", key, tcfg, build, logger, cleanup=cleanup)
