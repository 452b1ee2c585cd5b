"""Stage 3, teacher_inference: each source scores the training documents; compact shards per source."""
from __future__ import annotations

import gc
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.corpus_alignment import load_alignment
from fusion_core.data import read_documents
from fusion_core.marginal import Marginalizer
from fusion_core.models import load_causal_lm, load_tokenizer, resolve_device
from fusion_core.teacher import run_teacher
from fusion_core.vocab import VocabularyMap
from tasks.common import run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key


@task(name="teacher_inference", cache_policy=NO_CACHE, persist_result=False)
def teacher_inference(ctx: RunContext, data: StageResult, alignment: StageResult) -> StageResult:
    cfg = ctx.config
    tcfg = cfg.teacher
    key = stage_key("teacher_inference", tcfg, alignment.key, [m.key for m in ctx.sources])
    logger = run_logger()

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        import torch

        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        docs = read_documents(data.path / "train.jsonl")
        tgt_tok = load_tokenizer(ctx.target.path)
        device = resolve_device(tcfg.device)
        metrics: dict[str, float] = {}
        for src, src_cfg in zip(ctx.sources, cfg.sources):
            model = load_causal_lm(src.path, dtype=src_cfg.dtype, device=device,
                                   allow_pickle=getattr(src_cfg.model, "allow_pickle", False),
                                   trust_remote_code=getattr(src_cfg.model, "trust_remote_code", False))
            src_tok = load_tokenizer(src.path)
            vmap = VocabularyMap.load(alignment.path / f"{src.name}.vocab.npz")
            alignments = load_alignment(alignment.path / f"{src.name}.alignment.parquet")
            needs_text = cfg.alignment.marginalize or cfg.alignment.projection == "text"
            marginalizer = Marginalizer.build(src_tok, tgt_tok) if needs_text else None
            last = [time.perf_counter()]

            def progress(tokens: int, n_docs: int, name=src.name) -> None:
                if time.perf_counter() - last[0] > 15:
                    last[0] = time.perf_counter()
                    logger.info(f"{name}: {n_docs}/{len(docs)} documents, {tokens} tokens")

            stats = run_teacher(model, src_tok, tgt_tok, docs, alignments, vmap.src_to_tgt, tmp / src.name,
                                top_k=tcfg.top_k, temperature=tcfg.temperature, batch_size=tcfg.batch_size,
                                docs_per_shard=tcfg.docs_per_shard, device=device, progress=progress,
                                marginalizer=marginalizer, src_special=vmap.special_mask(),
                                projection=cfg.alignment.projection)
            m = stats.metrics()
            logger.info(f"{src.name}: {stats.source_tokens} tokens in {stats.seconds:.1f} s "
                        f"({m['tokens_per_s']:.0f} tokens/s), {m['bytes_per_target_token']:.1f} bytes/target token, "
                        f"teacher distribution at {m.get('coverage', 0):.1%} of target positions")
            metrics.update({f"{src.name}.{k}": v for k, v in m.items()})
            del model
            gc.collect()
        return metrics

    return run_stage(ctx, "teacher_inference", key, tcfg, build, logger)
