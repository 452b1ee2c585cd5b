"""Run a Python program in a subprocess with resource limits and an audit-hook guard.

`run_program(program, timeout=..., memory_mb=...)` returns an `ExecResult`. It is a pure library
(standard library only); `fusion_core.humaneval` uses it to run each completion's tests.

The sandbox
-----------
The program runs in a fresh ``python -I -S -B`` process (isolated mode, no site-packages, no
bytecode writes), with a minimal environment, a fresh temporary directory as cwd (HOME and TMPDIR
point there too), stdin and stdout detached, in its own session / process group, which is killed
as a whole after `timeout` seconds of wall time. A small prelude runs first in that process and

- sets resource limits (hard = soft, so the program cannot raise them back): RLIMIT_AS
  (`memory_mb`), RLIMIT_CPU (about timeout + 1 s), RLIMIT_FSIZE (1 MiB per file), RLIMIT_CORE (0).
  They are set in the child itself rather than through `preexec_fn`, which is unsafe in a
  process that has threads (callers such as `fusion_core.humaneval` run programs from a thread
  pool);
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

Statuses (`ExecResult.status`, `STATUSES`): "passed" (the program ran to the end), "failed" (an
exception, AssertionError included, or an early exit / crash; detail = the exception's last
line), "timeout" (killed after `timeout` s of wall time, or at the CPU limit), "sandbox_violation",
"error" (the program does not compile: SyntaxError and friends are "error", not "failed").
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
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STATUSES", "ExecResult", "run_program"]

STATUSES = ("passed", "failed", "timeout", "sandbox_violation", "error")
_FILE_SIZE_LIMIT = 1 << 20  # bytes per file written by the program's process
_DETAIL_CHARS = 300
_EXIT_FAILED, _EXIT_ERROR, _EXIT_VIOLATION = 81, 82, 83


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one program run: a status (see `STATUSES`), a short detail, wall seconds."""

    status: str
    detail: str
    seconds: float

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
        code = compile(source, "<program>", "exec")
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

def run_program(program: str, *, timeout: float, memory_mb: int) -> ExecResult:
    """Run the Python source `program` in a sandboxed subprocess (see the module docstring).

    Returns an ExecResult: "passed", "failed" (detail: the exception's last line), "timeout",
    "sandbox_violation" (detail: the event) or "error" (the program does not compile). The
    temporary directory is removed afterwards. Raises ValueError for bad limits, OSError when no
    process can be started.
    """
    if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 1:
        raise ValueError(f"memory_mb must be a positive integer, got {memory_mb!r}")
    if not sys.executable:
        raise RuntimeError("no Python interpreter to run tests with (sys.executable is empty)")

    root = Path(tempfile.mkdtemp(prefix="sandbox-"))
    try:
        sandbox = root / "sandbox"
        sandbox.mkdir()
        path = root / "program.py"  # outside the sandbox: the program cannot rewrite itself
        path.write_text(program, encoding="utf-8")
        with open(root / "stderr", "w+b") as err, open(root / "report", "w+b") as rep:
            return _run_process(root, sandbox, path, err, rep, timeout=float(timeout), memory_mb=memory_mb)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_process(root: Path, sandbox: Path, program: Path, err, rep, *, timeout: float,
                 memory_mb: int) -> ExecResult:
    nonce = secrets.token_hex(16)
    mark = "@@code-sandbox@@"
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
