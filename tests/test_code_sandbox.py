"""The sandbox that runs a Python program in a subprocess: its verdicts, limits and guard."""
from __future__ import annotations

import math
import os
import subprocess

import pytest

from fusion_core import code_sandbox
from fusion_core.code_sandbox import STATUSES, ExecResult, run_program

LIMITS = {"timeout": 5.0, "memory_mb": 512}


def run(program: str, **overrides) -> ExecResult:
    return run_program(program, **{**LIMITS, **overrides})


# ----------------------------------------------------------------------------- verdicts

def test_a_program_that_runs_to_the_end_passes():
    result = run("assert sum(range(4)) == 6\n")
    assert result.status == "passed" and result.detail == ""
    assert set(STATUSES) == {"passed", "failed", "timeout", "sandbox_violation", "error"}


def test_an_exception_fails_with_its_last_line():
    result = run("values = [1, 2]\nif sum(values) != 4:\n    raise AssertionError('the sum is 3')\n")
    assert result.status == "failed"
    assert result.detail.startswith("AssertionError")
    other = run("undefined_name\n")
    assert other.status == "failed" and "NameError" in other.detail


def test_a_syntax_error_is_counted_as_error():
    result = run("x = 1 +\n")
    assert result.status == "error"
    assert result.detail.startswith("SyntaxError")


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_exiting_before_the_program_ends_is_not_a_pass(exit_call):
    assert run(f"{exit_call}\nprint('the last line')\n").status == "failed"


@pytest.mark.parametrize("limits", [
    {"timeout": 0}, {"timeout": -1.0}, {"timeout": math.inf}, {"timeout": "5"},
    {"memory_mb": 0}, {"memory_mb": True}, {"memory_mb": 1.5},
])
def test_bad_limits_are_refused_naming_them(limits):
    with pytest.raises(ValueError, match=next(iter(limits))):
        run("pass\n", **limits)


# ----------------------------------------------------------------------------- limits

def test_an_infinite_loop_times_out_and_its_process_group_is_gone(monkeypatch):
    pids = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pids.append(self.pid)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    result = run("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout"
    assert result.seconds >= 1.0  # ended by the timeout, not before it
    assert len(pids) == 1
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)


def test_allocating_past_the_memory_limit_fails_fast():
    result = run("data = bytearray(8 * 1024 ** 3)\n", memory_mb=256)
    assert result.status == "failed"
    assert "MemoryError" in result.detail
    assert result.seconds < 3.0


def test_no_temporary_directory_is_left_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(code_sandbox.tempfile, "tempdir", str(tmp_path))
    run("pass\n")
    run("while True:\n    pass\n", timeout=0.5)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the guard

def test_writing_outside_the_sandbox_is_a_violation_and_nothing_is_written(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')\n")
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
    result = run("import os\n" + action.format(path=str(target)) + "\n")
    assert result.status == "sandbox_violation", result
    assert not os.path.lexists(target)


def test_mutating_an_existing_file_outside_is_a_violation(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for action in ("os.remove({p!r})", "os.rename({p!r}, 'stolen.txt')", "os.chmod({p!r}, 0o777)",
                   "os.truncate({p!r}, 0)", "os.link({p!r}, 'hard')"):
        result = run("import os\n" + action.format(p=str(victim)) + "\n")
        assert result.status == "sandbox_violation", (action, result)
    assert victim.read_text() == "keep me"


def test_writing_inside_the_sandbox_is_allowed():
    program = (
        "import os, shutil, tempfile\n"
        "with open('scratch.txt', 'w') as f:\n"
        "    f.write('41')\n"
        "os.makedirs('a/b', exist_ok=True)\n"
        "os.rename('scratch.txt', 'a/b/moved.txt')\n"
        "value = int(open('a/b/moved.txt').read())\n"
        "shutil.rmtree('a')\n"
        "fd, name = tempfile.mkstemp()\n"
        "os.close(fd)\n"
        "os.remove(name)\n"
        "assert value + 1 == 42\n"
    )
    assert run(program).status == "passed"


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
    result = run("import os, subprocess, socket, _posixsubprocess\n" + action + "\n")
    assert result.status == "sandbox_violation", result


def test_a_violation_caught_by_the_program_is_still_a_violation(tmp_path):
    program = (
        "import os\n"
        "try:\n"
        "    os.system('true')\n"
        "except BaseException:\n"
        "    pass\n"
        "try:\n"
        f"    open({str(tmp_path / 'x')!r}, 'w')\n"
        "except BaseException:\n"
        "    pass\n"
    )
    result = run(program)
    assert result.status == "sandbox_violation"
    assert "os.system" in result.detail
