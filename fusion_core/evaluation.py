"""The evaluation primitives: lm-eval tasks and held-out perplexity per domain (evaluation_suite
runs them per unit for a model).

Pure library (no Prefect, no MLflow): it returns plain dicts and MLflow-safe metric names, and
the task layer logs them. Every model is scored as every other stage sees text: the model's
start token first (`fusion_core.tokenization.start_token_id`), then the text's tokens. That
holds for lm-eval too: `evaluate_lm_eval` wraps lm-eval's HF model so that each context starts
with that token, whatever the tokenizer's own special-token settings.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Iterable

from fusion_core.eval_tasks import BUNDLED_TAG, BUNDLED_TASKS, materialize_tasks

__all__ = [
    "BUNDLED_TAG", "BUNDLED_TASKS", "LmEvalTaskError", "evaluate_lm_eval", "flatten_lm_eval_metrics", "json_safe",
    "materialize_tasks", "perplexity_by_domain", "perplexity_metrics", "sanitize_metric_name",
]

ALL_DOMAINS = "all"
# MLflow's own rule (mlflow.utils.validation) also allows ':' except on Windows, and Python's \w
# there is Unicode-aware; we keep the portable ASCII subset.
_METRIC_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_METRIC_MAX_LEN = 250  # mlflow MAX_ENTITY_KEY_LENGTH


class LmEvalTaskError(RuntimeError):
    """An lm-eval task that is known by name but cannot be built (e.g. its data is not reachable)."""


# ----------------------------------------------------------------------------- metric names

def sanitize_metric_name(name: str) -> str:
    """Make `name` a valid MLflow metric key on every platform.

    Characters other than ASCII letters, digits, '_', '-', '.', ' ' and '/' become '_'; the
    name must not change under posix path normalisation (no empty, '.' or '..' segments, no
    leading or trailing '/'); names past MLflow's 250 characters are cut and end with a hash of
    the full name so that distinct names stay distinct.
    """
    cleaned = _METRIC_BAD_CHARS.sub("_", str(name))
    segments = [s for s in cleaned.split("/") if s != ""]
    segments = ["_" if s in (".", "..") else s for s in segments]
    cleaned = "/".join(segments) or "_"
    if len(cleaned) > _METRIC_MAX_LEN:
        digest = hashlib.sha1(cleaned.encode()).hexdigest()[:8]
        cleaned = cleaned[: _METRIC_MAX_LEN - 9].rstrip("/") + "-" + digest
    return cleaned


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy scalars
            import numpy as np

            if isinstance(value, np.generic) and np.issubdtype(value.dtype, np.number):
                return math.isfinite(float(value))
        except ImportError:  # pragma: no cover
            pass
        return False
    return math.isfinite(float(value))


def flatten_lm_eval_metrics(results: dict, *, prefix: str = "eval") -> dict[str, float]:
    """MLflow-safe metrics from an lm-eval results dict.

    `results["results"][task]["<metric>,<filter>"]` becomes `<prefix>.<task>.<metric>`, with
    `.<filter>` appended when the filter is not "none" (e.g. "exact_match,strict-match" ->
    "eval.fusion_arith_gen.exact_match.strict-match"). Group rows (`results["groups"]`) are
    treated alike; `results["n-samples"][task]["effective"]` becomes `<prefix>.<task>.n_samples`.
    Only finite numbers are kept (lm-eval writes "N/A" for a missing stderr).
    """
    out: dict[str, float] = {}
    rows: dict[str, dict] = {}
    for section in ("results", "groups"):
        for task, row in (results.get(section) or {}).items():
            if isinstance(row, dict):
                rows.setdefault(task, row)
    for task, row in rows.items():
        for key, value in row.items():
            # Metric keys are "<metric>,<filter>"; others ("alias", "sample_len") are bookkeeping.
            if "," not in str(key) or not _is_number(value):
                continue
            metric, _, flt = str(key).partition(",")
            name = f"{prefix}.{task}.{metric}" + ("" if flt == "none" else f".{flt}")
            out[sanitize_metric_name(name)] = float(value)
    for task, counts in (results.get("n-samples") or {}).items():
        if isinstance(counts, dict) and _is_number(counts.get("effective")):
            out[sanitize_metric_name(f"{prefix}.{task}.n_samples")] = float(counts["effective"])
    return out


def perplexity_metrics(perplexity: dict[str, dict[str, float]], *, prefix: str = "ppl") -> dict[str, float]:
    """`{domain: {key: value}}` from `perplexity_by_domain` as `<prefix>.<domain>.<key>` metrics."""
    return {sanitize_metric_name(f"{prefix}.{domain}.{key}"): float(value)
            for domain, row in perplexity.items() for key, value in row.items() if _is_number(value)}


# ----------------------------------------------------------------------------- lm-eval

def json_safe(obj: Any) -> Any:
    """A copy of `obj` that `json.dumps(..., allow_nan=False)` accepts.

    Non-finite floats become None; numpy/torch values become Python numbers or lists; anything
    else that JSON cannot hold (functions in task configs, dtypes, ...) becomes a short string.
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        try:
            return json_safe(tolist())
        except Exception:
            pass
    if callable(obj):
        return f"<{type(obj).__name__} {getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}>"
    return str(obj)


def _task_manager(tasks: list[str], include_dir: Path | None):
    """A TaskManager that knows every name in `tasks`; ValueError naming those none knows.

    Indexing lm-eval's own ~15k task names takes ~10 s, so the registry is only indexed when
    some requested name is not in `include_dir`.
    """
    from lm_eval.tasks import TaskManager

    manager_cls = _named_error_task_manager(TaskManager)
    include = str(Path(include_dir).resolve()) if include_dir is not None else None
    if include is not None:
        local = manager_cls(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    full = manager_cls(include_path=include)
    unknown = [t for t in tasks if t not in full.all_tasks]
    if unknown:
        bundled = sorted(BUNDLED_TASKS) + [BUNDLED_TAG]
        raise ValueError(f"unknown lm-eval task(s) {unknown}: not bundled ({bundled}"
                         f"{', from ' + include if include else ''}) and not in lm-eval's registry")
    return full


def _named_error_task_manager(base):
    class NamedErrorTaskManager(base):
        """Re-raises a task's build error (often: its dataset is not reachable offline) naming the task."""

        def _load_spec(self, spec):
            try:
                return super()._load_spec(spec)
            except Exception as exc:
                raise LmEvalTaskError(
                    f"lm-eval task {spec!r} could not be built (is its data reachable offline?): "
                    f"{type(exc).__name__}: {exc}") from exc

    return NamedErrorTaskManager


def _start_token_lm(model, tokenizer, *, batch_size: int):
    """lm-eval's HFLM around an in-memory model, with every context starting with the start token."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from fusion_core.tokenization import start_token_id

    start = start_token_id(tokenizer)

    class StartTokenHFLM(HFLM):
        def __init__(self, **kwargs):
            self._start_id = start
            self._prepend_start = True
            super().__init__(prefix_token_id=start, **kwargs)

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = self.tokenizer.encode(string, add_special_tokens=False)
            if add_special_tokens is not False and self._prepend_start and (not ids or ids[0] != self._start_id):
                ids = [self._start_id, *ids]
            if left_truncate_len:
                ids = ids[-left_truncate_len:]
            return ids

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            rows = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._start_id
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
                ids[i, cols] = torch.tensor(row, dtype=torch.long)
                mask[i, cols] = 1
            return ids, mask

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            # lm-eval puts prefix_token_id (= the start token) in front of rolling windows itself.
            self._prepend_start = False
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self._prepend_start = True

    return StartTokenHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _run_lm_eval(model, tokenizer, manager, tasks: list[str], *, limit, batch_size: int, device: str,
                 num_fewshot: int | None, seed: int, log_samples: bool, bootstrap_iters: int) -> dict:
    import lm_eval

    lm = _start_token_lm(model, tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, batch_size=batch_size,
        device=device, limit=limit, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return json_safe(results or {})


def evaluate_lm_eval(model_dir: Path, tasks: list[str], *, include_dir: Path | None, limit: int | None,
                     batch_size: int, device: str = "cpu", num_fewshot: int | None = None, seed: int = 0,
                     log_samples: bool = False, bootstrap_iters: int = 1000) -> dict:
    """Run lm-eval `tasks` on the model in the local folder `model_dir`; return lm-eval's results dict.

    `tasks` are task, group or tag names: the bundled ones (from `include_dir`, made by
    `materialize_tasks`) or any that lm-eval's registry knows. The model is loaded once, in
    fp32 on CPU (bf16 on CUDA), and handed to lm-eval in memory. The returned dict is
    JSON-serialisable (`allow_nan=False`); per-sample records only with `log_samples`.

    Raises ValueError for an empty task list or names no TaskManager knows (before loading the
    model); LmEvalTaskError when a known task cannot be built (its data unreachable offline);
    fusion_core.models.ModelLoadError for a bad model folder.
    """
    from fusion_core.models import load_causal_lm, load_tokenizer

    tasks = _check_task_list(tasks)
    manager = _task_manager(tasks, include_dir)
    model = load_causal_lm(Path(model_dir), device=device)
    tokenizer = load_tokenizer(Path(model_dir))
    return _run_lm_eval(model, tokenizer, manager, tasks, limit=limit, batch_size=batch_size, device=device,
                        num_fewshot=num_fewshot, seed=seed, log_samples=log_samples,
                        bootstrap_iters=bootstrap_iters)


def _check_task_list(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(dict.fromkeys(tasks))  # keep order, drop repeats
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    bad = [t for t in tasks if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"lm-eval task names must be non-empty strings, got {bad!r}")
    return tasks


# ----------------------------------------------------------------------------- perplexity

def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, skip) windows over a sequence of n ids so that each of ids[1:] is scored once.

    A window feeds ids[start:end] and scores its targets ids[start+1+skip:end]; later windows
    keep up to max_length - stride tokens of left context.
    """
    if n <= max_length:
        return [(0, n, 0)]
    out = [(0, max_length, 0)]
    end = max_length
    while end < n:
        new_end = min(n, end + stride)
        start = new_end - max_length
        out.append((start, new_end, end - start - 1))
        end = new_end
    return out


def _sequence_nll(model, sequences: list, *, batch_size: int, max_length: int, stride: int) -> list[float]:
    """Total negative log-likelihood (nats) of ids[1:] given the prefix, for each id sequence."""
    import torch

    device = next(model.parameters()).device
    items = []  # (sequence index, ids of the window, number of leading targets to skip)
    for k, ids in enumerate(sequences):
        for start, end, skip in _windows(len(ids), max_length, stride):
            if end - start >= 2:
                items.append((k, ids[start:end], skip))
    items.sort(key=lambda it: -len(it[1]))  # similar lengths share a batch: little padding
    totals = [0.0] * len(sequences)
    with torch.inference_mode():
        for b in range(0, len(items), batch_size):
            batch = items[b:b + batch_size]
            width = len(batch[0][1])
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width - 1), -100, dtype=torch.long)
            for i, (_, window, skip) in enumerate(batch):
                row = torch.as_tensor(window, dtype=torch.long)
                ids[i, : len(row)] = row
                mask[i, : len(row)] = 1
                labels[i, skip: len(row) - 1] = row[1 + skip:]
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.to(device).reshape(-1),
                ignore_index=-100, reduction="none").view(len(batch), -1)
            for i, (k, _, _) in enumerate(batch):
                totals[k] += float(nll[i].double().sum())
    return totals


def _scored_documents(model, tokenizer, documents: Iterable, *, batch_size: int, max_length: int,
                      stride: int | None) -> tuple[list, list[int], list[float]]:
    """(the documents with text, the tokens scored in each, each one's total NLL in nats)."""
    from fusion_core.tokenization import encode_document

    docs = [d for d in documents if d.text]
    if not docs:
        raise ValueError("no non-empty documents to score")
    if any(d.domain == ALL_DOMAINS for d in docs):
        raise ValueError(f"domain name {ALL_DOMAINS!r} is reserved for the total over all domains")
    limit = getattr(model.config, "max_position_embeddings", None)
    max_length = min(max_length, limit) if limit else max_length
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length), got {stride}")
    sequences = [encode_document(tokenizer, d.text).ids for d in docs]
    nll = _sequence_nll(model, sequences, batch_size=batch_size, max_length=max_length, stride=stride)
    return docs, [len(ids) - 1 for ids in sequences], nll


def _perplexity_table(docs: list, tokens: list[int], nll: list[float]) -> dict[str, dict[str, float]]:
    """`{domain: {documents, tokens, bytes, nll_per_token, perplexity, bits_per_byte}}` and "all"."""
    sums: dict[str, dict[str, float]] = {}
    for doc, n_tokens, total in zip(docs, tokens, nll):
        for domain in (doc.domain, ALL_DOMAINS):
            row = sums.setdefault(domain, {"documents": 0, "tokens": 0, "bytes": 0, "nll": 0.0})
            row["documents"] += 1
            row["tokens"] += n_tokens
            row["bytes"] += len(doc.text.encode("utf-8"))
            row["nll"] += total
    out = {}
    for domain in sorted(sums, key=lambda d: (d == ALL_DOMAINS, d)):
        row = sums[domain]
        per_token = row["nll"] / row["tokens"] if row["tokens"] else float("nan")
        out[domain] = {
            "documents": row["documents"], "tokens": row["tokens"], "bytes": row["bytes"],
            "nll_per_token": per_token,
            "perplexity": math.exp(per_token) if row["tokens"] else float("nan"),
            "bits_per_byte": row["nll"] / (math.log(2) * row["bytes"]),
        }
    return out


def _perplexity_with(model, tokenizer, documents: Iterable, *, batch_size: int, max_length: int,
                     stride: int | None) -> dict[str, dict[str, float]]:
    return _perplexity_table(*_scored_documents(model, tokenizer, documents, batch_size=batch_size,
                                                max_length=max_length, stride=stride))


def perplexity_by_domain(model_dir: Path, documents: Iterable, *, batch_size: int = 8, max_length: int = 512,
                         device: str = "cpu", stride: int | None = None) -> dict[str, dict[str, float]]:
    """Held-out language-modelling scores of the model in `model_dir`, per document domain and "all".

    `documents` are objects with `.domain` and `.text` (fusion_core.data.Document). Each is
    scored as start token + its tokens, every token predicted; one longer than `max_length`
    (capped at the model's max positions) is scored in windows of `max_length` that advance by
    `stride` (default max_length // 2), each token exactly once. Empty texts are skipped.
    Returns `{domain: {documents, tokens, bytes, nll_per_token, perplexity, bits_per_byte}}`
    where perplexity = exp(nll_per_token) and bits_per_byte = total NLL / (ln 2 * UTF-8 bytes).

    Raises ValueError when no document has text or a domain is named "all".
    """
    from fusion_core.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(Path(model_dir), device=device)
    tokenizer = load_tokenizer(Path(model_dir))
    return _perplexity_with(model, tokenizer, documents, batch_size=batch_size, max_length=max_length,
                            stride=stride)
