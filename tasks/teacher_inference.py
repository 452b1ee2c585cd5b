"""Stage 3, teacher_inference: each source scores the training documents, shard by shard.

Each shard (`teacher.docs_per_shard` documents) is one Prefect task run (`teacher_shard`, mapped
over the shards that are not complete yet, on a ThreadPoolTaskRunner of `teacher.workers`
threads sharing one loaded model per source). Shards are written into a work folder outside
the stage output (`<workspace>/work/teacher_inference/<stage key>/<source>/`), each atomically
with a sidecar holding its checksum and statistics; a rerun after a crash or a kill scores only
the shards that are missing, interrupted or corrupt. When every shard of every source is
complete they are linked into the stage output, whose manifest is written last. A shard task
reads its own documents and alignments from disk: memory is bounded by the shard, not the corpus.
"""
from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE

from fusion_core.corpus_alignment import AlignmentFile
from fusion_core.data import DocumentFile
from fusion_core.marginal import Marginalizer
from fusion_core.models import load_causal_lm, load_tokenizer, model_context_length, resolve_device
from fusion_core.teacher import (
    ShardSpec, ShardStats, aggregate_stats, plan_shards, read_shard_stats, score_shard, shard_state,
)
from fusion_core.tokenization import encode_document
from fusion_core.vocab import VocabularyMap
from tasks.common import TokenProgress, run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key


@dataclass
class _ShardJob:
    """What every shard task of one source needs; kept in-process (never serialised by Prefect)."""

    source: str
    model: Any
    src_tok: Any
    tgt_tok: Any
    docs: DocumentFile
    alignments: AlignmentFile
    vmap: VocabularyMap
    folder: Path
    specs: list[ShardSpec]
    fingerprint: str
    options: dict
    progress: TokenProgress
    lock: threading.Lock = field(default_factory=threading.Lock)


_JOBS: dict[str, _ShardJob] = {}


@task(name="teacher_shard", cache_policy=NO_CACHE, persist_result=False, task_run_name="{source}-{index:05d}")
def teacher_shard(job_id: str, source: str, index: int) -> dict:
    """Score one shard of one source (see the module doc); returns its statistics."""
    job = _JOBS[job_id]
    spec = job.specs[index]
    seen = [0]

    def progress(tokens: int, _docs: int) -> None:
        job.progress.advance(tokens - seen[0])
        seen[0] = tokens

    stats = score_shard(job.model, job.src_tok, job.tgt_tok, job.docs.slice(spec.start, spec.stop), job.alignments,
                        job.vmap.src_to_tgt, job.folder, spec, fingerprint=job.fingerprint,
                        src_special=job.vmap.special_mask(), source_name=source, progress=progress, **job.options)
    return stats.to_json()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@task(name="teacher_inference", cache_policy=NO_CACHE, persist_result=False)
def teacher_inference(ctx: RunContext, data: StageResult, alignment: StageResult) -> StageResult:
    cfg = ctx.config
    tcfg = cfg.teacher
    # How many threads score does not change what is scored: not part of the key.
    key = stage_key("teacher_inference", tcfg.model_dump(mode="json", exclude={"workers", "threads"}),
                    alignment.key, [m.key for m in ctx.sources])
    logger = run_logger()

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        import torch
        from prefect.task_runners import ThreadPoolTaskRunner

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
            src_tok = load_tokenizer(src.path)
            if todo:
                model = load_causal_lm(src.path, dtype=src_cfg.dtype, device=device,
                                       allow_pickle=getattr(src_cfg.model, "allow_pickle", False),
                                       trust_remote_code=getattr(src_cfg.model, "trust_remote_code", False))
                vmap = VocabularyMap.load(alignment.path / f"{src.name}.vocab.npz")
                needs_text = cfg.alignment.marginalize or cfg.alignment.projection == "text"
                # Tokens to score, estimated from the characters left and a sample's tokens per character.
                sample = docs.sample(200)
                per_char = (sum(len(encode_document(src_tok, d.text)) for d in sample)
                            / max(sum(len(d.text) for d in sample), 1))
                total = int(per_char * chars * len(todo) / max(len(specs), 1))
                job = _ShardJob(
                    source=src.name, model=model, src_tok=src_tok, tgt_tok=tgt_tok, docs=docs,
                    alignments=AlignmentFile(alignment.path / f"{src.name}.alignment.parquet"), vmap=vmap,
                    folder=folder, specs=specs, fingerprint=key,
                    options=dict(top_k=tcfg.top_k, temperature=tcfg.temperature, batch_size=tcfg.batch_size,
                                 device=device, projection=cfg.alignment.projection,
                                 marginalizer=Marginalizer.build(src_tok, tgt_tok) if needs_text else None,
                                 context_length=model_context_length(src.path)),
                    progress=TokenProgress(src.name, total, logger))
                job_id = uuid.uuid4().hex
                _JOBS[job_id] = job
                scoring_start = time.perf_counter()
                try:
                    with ThreadPoolTaskRunner(max_workers=tcfg.workers) as runner:
                        futures = runner.map(teacher_shard, {"job_id": unmapped(job_id), "source": unmapped(src.name),
                                                             "index": [s.index for s in todo]})
                        for f in futures:
                            f.result()  # re-raises the first failure, naming source and document
                    scoring_seconds = time.perf_counter() - scoring_start
                finally:
                    job.progress.close()
                    _JOBS.pop(job_id, None)
                    del job, model
                    gc.collect()
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

    result = run_stage(ctx, "teacher_inference", key, tcfg, build, logger)
    work = cfg.workspace.root / "work" / "teacher_inference" / key
    if work.exists() and not result.reused:
        shutil.rmtree(work, ignore_errors=True)  # the stage output holds the shards now (hard links)
    return result
