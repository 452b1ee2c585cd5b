"""Shared fixtures: an offline, isolated environment and tiny models of three tokenizer families."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="llm-fusion-tests-"))
# Isolate every test session: nothing from the network, nothing from an earlier session's caches.
os.environ.update(
    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    HF_HOME=str(_SESSION_TMP / "hf"),
    MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_HOME=str(_SESSION_TMP / "prefect"),
    PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(_SESSION_TMP / "prefect-results"),
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
    TOKENIZERS_PARALLELISM="false",
)
os.environ.pop("PREFECT_API_URL", None)

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fusion pipeline distils several teachers into one student model.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "12 + 35 = 47\n7 * 8 = 56\n100 - 1 = 99\n",
    "Knowledge fusion selects, per input, which sources to learn from.",
    "Tokenizers cut text at different places; alignment repairs that.",
    "café naïve résumé — unicode text survives every tokenizer.",
] * 4


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    return list(TINY_CORPUS)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders holding a tiny random Llama and its tokenizer, one per tokenizer family."""
    from fusion_core.model_zoo import make_llama, train_tokenizer

    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for i, (family, vocab) in enumerate([("byte_level", 400), ("metaspace", 400), ("wordpiece", 300)]):
        tok = train_tokenizer(family, TINY_CORPUS, vocab_size=vocab)
        path = root / family
        make_llama(tok, seed=i, out_dir=path)
        out[family] = path
    return out
