"""Stage 1, prepare_data: corpora -> cleaned, chunked train/validation documents."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.config import CorpusConfig, PipelineConfig
from fusion_core.demo_corpus import CORPUS_VERSION
from fusion_core.data import DataError, clean_text, prepare_documents, read_corpus_texts, write_documents
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
    paths = write_demo_corpus(out, seed=cfg.data.seed)
    return paths[domain]


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


@task(name="prepare_data", cache_policy=NO_CACHE, persist_result=False)
def prepare_data(ctx: RunContext) -> StageResult:
    cfg = ctx.config
    models = (*ctx.sources, ctx.target)
    # Generated corpora change with the generator's version, which the fingerprint must see.
    corpus_version = CORPUS_VERSION if any(c.builtin for c in cfg.data.corpora) else None
    key = stage_key("prepare_data", cfg.data, corpus_version, [m.key for m in models])

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        tokenizers = [load_tokenizer(m.path) for m in models]
        corpora = [(c.name, c.domain, corpus_texts(c, cfg)) for c in cfg.data.corpora]
        prepared = prepare_documents(corpora, tokenizers=tokenizers, max_length=cfg.data.max_length,
                                     min_chars=cfg.data.min_chars,
                                     validation_fraction=cfg.data.validation_fraction, seed=cfg.data.seed)
        write_documents(tmp / "train.jsonl", prepared.train)
        write_documents(tmp / "validation.jsonl", prepared.validation)
        return prepared.stats

    return run_stage(ctx, "prepare_data", key, cfg.data, build, run_logger())
