"""Stage 2, align_vocabularies: per source, a vocabulary map, every document's labelled alignment, a report."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.corpus_alignment import ALIGNMENT_FORMAT, align_corpus, save_alignment
from fusion_core.data import read_documents
from fusion_core.models import load_tokenizer, model_vocab_size
from fusion_core.vocab import VOCAB_MAP_VERSION, VocabularyMap, build_vocabulary_map, tokenizer_fingerprint
from tasks.common import run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key
from tasks.tracking import log_file_artifact


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
    acfg = cfg.alignment
    key = stage_key("align_vocabularies", acfg, VOCAB_MAP_VERSION, ALIGNMENT_FORMAT, data.key,
                    [m.key for m in ctx.sources], ctx.target.key)
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
            aligned = align_corpus(src_tok, tgt_tok, docs, vmap.src_to_tgt, method=acfg.method,
                                   marginalize=acfg.marginalize, examples=acfg.report_examples,
                                   source_name=src.name, target_name=ctx.target.name, vocab_stats=vmap.stats())
            save_alignment(tmp / f"{src.name}.alignment.parquet", aligned.alignments)
            (tmp / f"{src.name}.alignment.md").write_text(aligned.report.markdown())
            m = aligned.report.metrics()
            metrics.update({f"{src.name}.{k}": v for k, v in m.items()})
            logger.info(f"{src.name}: vocabulary exact {vmap.stats().get('exact_rate', 0):.1%}; target positions "
                        f"with a teacher distribution {m.get('coverage', 0):.1%} (shared boundary "
                        f"{m.get('boundary_rate', 0):.1%}, marginalised {m.get('marginal_rate', 0):.1%})"
                        + (f"; {aligned.report.source_unk_tokens} source unk tokens"
                           if aligned.report.source_unk_tokens else ""))
        return metrics

    def after(result: StageResult) -> None:
        for src in ctx.sources:
            report = result.path / f"{src.name}.alignment.md"
            if report.is_file():
                log_file_artifact(report, "alignment")

    return run_stage(ctx, "align_vocabularies", key, acfg, build, logger, after=after)
