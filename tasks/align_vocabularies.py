"""Stage 2, align_vocabularies: per source, a vocabulary map and every document's position alignment."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.corpus_alignment import align_corpus, save_alignment
from fusion_core.data import read_documents
from fusion_core.models import load_tokenizer, model_vocab_size
from fusion_core.vocab import VOCAB_MAP_VERSION, VocabularyMap, build_vocabulary_map, tokenizer_fingerprint
from tasks.common import run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key


def vocabulary_map(src_tok, tgt_tok, cache_dir: Path, src_vocab_size: int | None = None) -> VocabularyMap:
    """The map for this pair of tokenizers, built once and cached by both fingerprints and the map version."""
    name = f"v{VOCAB_MAP_VERSION}-{tokenizer_fingerprint(src_tok)}-{tokenizer_fingerprint(tgt_tok)}-{src_vocab_size}"
    path = cache_dir / f"{name}.npz"
    if path.is_file():
        return VocabularyMap.load(path)
    vmap = build_vocabulary_map(src_tok, tgt_tok, src_vocab_size=src_vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    vmap.save(path)
    return vmap


@task(name="align_vocabularies", cache_policy=NO_CACHE, persist_result=False)
def align_vocabularies(ctx: RunContext, data: StageResult) -> StageResult:
    cfg = ctx.config
    key = stage_key("align_vocabularies", cfg.alignment, VOCAB_MAP_VERSION, data.key, [m.key for m in ctx.sources], ctx.target.key)
    logger = run_logger()

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        docs = read_documents(data.path / "train.jsonl")
        tgt_tok = load_tokenizer(ctx.target.path)
        metrics: dict[str, float] = {}
        for src in ctx.sources:
            src_tok = load_tokenizer(src.path)
            vmap = vocabulary_map(src_tok, tgt_tok, cfg.workspace.root / "cache" / "vocab_maps",
                                  model_vocab_size(src.path))
            vmap.save(tmp / f"{src.name}.vocab.npz")
            aligned = align_corpus(src_tok, tgt_tok, docs)
            save_alignment(tmp / f"{src.name}.alignment.parquet", aligned.tgt_to_src)
            for k, v in {**vmap.stats(), **aligned.stats}.items():
                metrics[f"{src.name}.{k}"] = v
            logger.info(f"{src.name}: vocabulary exact {vmap.stats().get('exact_rate', 0):.1%}, "
                        f"positions aligned {aligned.stats['aligned_rate']:.1%}")
        return metrics

    return run_stage(ctx, "align_vocabularies", key, cfg.alignment, build, logger)
