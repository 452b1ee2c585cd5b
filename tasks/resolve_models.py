"""resolve_models: every source and the target as a local HF folder with a content key.

Runs before the five stages: GGUF files and packaged models are converted once, recipe models
(the demo's specialists and target) are built once, all cached under the workspace's model
folder. A model that cannot be read fails here, before any expensive stage starts.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.config import PipelineConfig
from fusion_core.filehash import FileHashCache
from fusion_core.loaders import resolve_model_folder
from fusion_core.models import ModelLoadError, load_tokenizer, model_context_length, model_folder_key, model_vocab_size
from fusion_core.vocab import vocabulary_problem
from tasks.common import run_logger
from tasks.stage import ResolvedModel


def resolve_model(ref, name: str, role: str, cfg: PipelineConfig, logger=None) -> ResolvedModel:
    """Resolve one model reference. Raises ModelLoadError naming the model."""
    cache = cfg.workspace.models_dir
    try:
        path = resolve_model_folder(ref, cache, None if logger is None else
                                    (lambda msg: logger.info(f"{role} {name!r}: {msg}")))
        tok = load_tokenizer(path)
        if not getattr(tok, "is_fast", False):
            raise ModelLoadError(f"{path}: the tokenizer is not a fast tokenizer (offsets are needed)")
        check_vocabulary_sizes(path, tok)
        problem = vocabulary_problem(tok)
        if problem is not None:
            raise ModelLoadError(f"{path}: {problem}")
    except ModelLoadError as exc:
        raise ModelLoadError(f"{role} {name!r}: {exc}") from None
    except ValueError as exc:  # unknown recipe and similar
        raise ModelLoadError(f"{role} {name!r}: {exc}") from None
    cache = FileHashCache.for_workspace(cfg.workspace.root)
    try:
        key = model_folder_key(path, trust_remote_code=getattr(ref, "trust_remote_code", False),
                               allow_pickle=getattr(ref, "allow_pickle", False), cache=cache)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{role} {name!r}: {exc}") from None
    finally:
        cache.save()
    return ResolvedModel(name=name, role=role, path=path, key=key)


def check_vocabulary_sizes(path, tokenizer) -> None:
    """Raise ModelLoadError when the model's output layer cannot produce every id of its tokenizer.

    A larger output layer (padded for speed, as Qwen's 151936) is fine; a smaller one means the
    tokenizer does not belong to the model and every later stage would index out of range.
    """
    vocab = model_vocab_size(path)
    if vocab is not None and vocab < len(tokenizer):
        raise ModelLoadError(f"{path}: the model's vocabulary ({vocab}) is smaller than its tokenizer's "
                             f"({len(tokenizer)}); the tokenizer does not belong to this model")


@task(name="resolve_models", cache_policy=NO_CACHE, persist_result=False)
def resolve_models(cfg: PipelineConfig) -> tuple[tuple[ResolvedModel, ...], ResolvedModel]:
    logger = run_logger()
    sources = tuple(resolve_model(s.model, s.name, "source", cfg, logger) for s in cfg.sources)
    target = resolve_model(cfg.target.model, cfg.target.name, "target", cfg, logger)
    for m in (*sources, target):
        check_context(m, cfg.data.max_length)
        logger.info(f"{m.role} {m.name}: {m.path}")
    return sources, target


def check_context(model: ResolvedModel, max_length: int) -> None:
    """Raise ModelLoadError when chunks of data.max_length tokens would not fit the model's context."""
    context = model_context_length(model.path)
    if context is not None and max_length > context:
        raise ModelLoadError(f"{model.role} {model.name!r}: data.max_length ({max_length}) exceeds the model's "
                             f"context ({context} positions); lower data.max_length")
