"""Stage 1, prepare_data: corpora -> cleaned, chunked train / validation / test documents."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.config import CorpusConfig, PipelineConfig
from fusion_core.data import (
    SPLITS, CorpusTexts, DataError, clean_text, prepare_documents, read_corpus_texts, write_documents,
)
from fusion_core.demo_corpus import builtin_corpus_version
from fusion_core.filehash import FileHashCache, tree_digest
from fusion_core.models import load_tokenizer
from tasks.common import run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key


def corpus_path(c: CorpusConfig, cfg: PipelineConfig) -> Path:
    """Where a corpus's files are; generated corpora are written into the workspace first."""
    if c.path is not None:
        return c.path
    from fusion_core.demo_corpus import write_demo_corpus

    domain = c.builtin.split(":", 1)[1]
    out = cfg.workspace.root / "builtin" / f"demo-seed{cfg.data.seed}"
    return write_demo_corpus(out, seed=cfg.data.seed, domains=(domain,))[domain]


def corpus_texts(c: CorpusConfig, cfg: PipelineConfig) -> list[str]:
    texts = read_corpus_texts(corpus_path(c, cfg), c.format, c.text_field, c.name)
    return texts[: c.max_documents] if c.max_documents else texts


def check_corpora(cfg: PipelineConfig) -> dict[str, int]:
    """Cheap check before any model is built: every corpus has usable documents. Raises DataError."""
    counts = {}
    for c in cfg.data.corpora:
        usable = sum(1 for t in corpus_texts(c, cfg) if len(clean_text(t)) >= cfg.data.min_chars)
        if usable == 0:
            where = c.path if c.path is not None else c.builtin
            raise DataError(f"corpus {c.name!r} ({where}) has no documents of at least "
                            f"{cfg.data.min_chars} characters after cleaning")
        counts[c.name] = usable
    return counts


def corpus_contents(cfg: PipelineConfig) -> dict[str, list[list[str]]] | None:
    """The content of every corpus given by path (each file's digest, cached by its identity in the
    workspace's hash cache): a corpus rewritten in place at the same path changes the key.
    Raises DataError naming a corpus file that cannot be read."""
    cache = FileHashCache.for_workspace(cfg.workspace.root)
    out = {}
    try:
        for c in cfg.data.corpora:
            if c.path is not None:
                try:
                    out[c.name] = tree_digest(c.path, cache)
                except OSError as exc:
                    raise DataError(f"corpus {c.name!r} ({c.path}): cannot read {exc.filename or c.path}: "
                                    f"{exc.strerror or exc}") from None
    finally:
        cache.save()
    return out or None


@task(name="prepare_data", cache_policy=NO_CACHE, persist_result=False)
def prepare_data(ctx: RunContext) -> StageResult:
    cfg = ctx.config
    models = (*ctx.sources, ctx.target)
    # Generated corpora change with their generator's version, which the fingerprint must see.
    corpus_versions = {c.builtin: builtin_corpus_version(c.builtin.split(":", 1)[1])
                       for c in cfg.data.corpora if c.builtin} or None
    contents = corpus_contents(cfg)
    key = stage_key("prepare_data", cfg.data, corpus_versions, [m.key for m in models], contents)
    logger = run_logger()

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        tokenizers = [load_tokenizer(m.path) for m in models]
        corpora = [CorpusTexts(c.name, c.domain, corpus_texts(c, cfg), c.heldout) for c in cfg.data.corpora]
        if corpus_contents(cfg) != contents:  # stat only, unless a file changed
            raise DataError("a corpus changed while prepare_data read it: run the pipeline again")
        prepared = prepare_documents(corpora, tokenizers=tokenizers, max_length=cfg.data.max_length,
                                     min_chars=cfg.data.min_chars, validation_fraction=cfg.data.validation_fraction,
                                     test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
        # train.jsonl feeds alignment, teachers and training; validation.jsonl every choice;
        # test.jsonl is reported once. Held-out corpora are in validation and test only.
        for split in SPLITS:
            write_documents(tmp / f"{split}.jsonl", prepared.split(split))
        stats = prepared.stats
        logger.info("prepare_data: " + "; ".join(
            f"{split} {stats[f'{split}_chunks']} chunks (documents: " + ", ".join(
                f"{k.split('.', 1)[1]} {v}" for k, v in sorted(stats.items()) if k.startswith(f"{split}_documents.")
            ) + ")" for split in SPLITS))
        return stats

    return run_stage(ctx, "prepare_data", key, cfg.data, build, logger)
