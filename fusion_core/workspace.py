"""Content-addressed stage outputs with manifests written last.

A stage's output folder is `<root>/stages/<stage>/<key>`, where the key is a fingerprint of
(its config section, the keys of its inputs, the stage's code version). The folder is built
under a temporary name and renamed into place only after its manifest (file list, sizes,
sha256) is written, so a folder that exists under its final name is complete; a crash leaves
only a `.partial-<pid>@<host>` folder that a later build of the key removes once its owner is dead.
`StageOutput.complete()` re-checks the manifest against the files (sizes always; checksums from
the workspace's hash cache while a file's identity is unchanged, see fusion_core.filehash), so
a corrupted or truncated output is rebuilt, not trusted; `verify_workspace(full=True)` re-hashes.

Builds of one key are serialised by an exclusive lock (fcntl.flock on
`<root>/locks/<stage>/<key>.lock`, which names its holder): two runs of one config on one
workspace, or two strategies sharing stages, never build the same output at once; the second
waits and then reuses what the first completed.

Permissions: the pipeline runs under the workspace's umask (`workspace.umask`, default 022:
`workspace_umask`), and a completed output's files and folders are set to what that umask gives
(0644 files, 0755 folders by default: `apply_modes`), also those a library created private
(tempfile's 0600/0700).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from fusion_core.filehash import FileHashCache

MANIFEST = "manifest.json"


def _canonical(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return obj  # json keeps 1.0 as 1.0: stable across runs
    return obj


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A stable hex fingerprint of JSON-able parts (pydantic models, dicts, paths, scalars)."""
    blob = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to `path` through a temporary file and os.replace (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and os.replace (never half-written)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def current_umask() -> int:
    """This process's umask, read without changing it (/proc) where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def workspace_umask(umask: int) -> Iterator[None]:
    """The process's umask set to `umask` (the workspace's) for the block, then restored."""
    old = os.umask(umask)
    try:
        yield
    finally:
        os.umask(old)


def apply_modes(folder: Path, umask: int | None = None) -> None:
    """Give `folder` and everything in it the permissions `umask` (default: the process's) gives
    to new files: folders and executable files 0777 & ~umask, other files 0666 & ~umask (0755 and
    0644 under the default 022). Symbolic links, and files another user owns, are left alone."""
    import stat

    umask = current_umask() if umask is None else umask
    folder = Path(folder)
    for p in [folder, *folder.rglob("*")]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        executable = stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR
        mode = (0o777 if executable else 0o666) & ~umask
        if stat.S_IMODE(st.st_mode) != mode:
            with contextlib.suppress(PermissionError):  # a file another user owns (a hard link)
                os.chmod(p, mode)


def build_manifest(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return {"files": files, "meta": meta, "completed_at": time.time()}


def verify_manifest(folder: Path, cache: FileHashCache | None = None, *, full: bool = False) -> tuple[bool, str]:
    """(True, "") when `folder` has a manifest whose files all exist with their size and checksum.

    Without `cache` every file is hashed. With one (the workspace's hash cache), a file whose
    identity (size, mtime, ctime, inode) is what it was when last hashed is not read again, unless
    `full`. On failure the reason names the file."""
    mpath = Path(folder) / MANIFEST
    if not mpath.is_file():
        return False, "no manifest"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        return False, f"unreadable manifest: {exc}"
    try:
        for rel, info in files.items():
            p = Path(folder) / rel
            if not p.is_file():
                return False, f"missing file {rel}"
            size = p.stat().st_size
            if size != info["size"]:
                return False, f"size mismatch in {rel} ({size} bytes, the manifest says {info['size']})"
            try:
                digest = file_sha256(p) if cache is None else cache.digest(p, "sha256", full=full)
            except OSError as exc:
                return False, f"unreadable file {rel}: {exc.strerror or exc}"
            if digest != info["sha256"]:
                return False, f"checksum mismatch in {rel}"
    finally:
        if cache is not None:
            cache.save()
    return True, ""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine and is not a zombie."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    try:  # a zombie (killed, not yet reaped) is dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _partial_owner(name: str) -> tuple[int | None, str | None]:
    """(pid, host) from a partial folder's name `<key>.partial-<pid>@<host>` (host None: a name
    from before hosts were recorded, taken as this machine's); pid None when unreadable."""
    tail = name.rsplit(".partial-", 1)[-1]
    pid, _, host = tail.partition("@")
    return (int(pid) if pid.isdigit() else None), (host or None)


# Stage locks this process holds, by (lock file, thread): building() inside claim() must not
# lock again (flock locks of two open files exclude each other even within one process).
_HELD: set[tuple[str, int]] = set()


@dataclass(frozen=True)
class StageOutput:
    """The output folder of one stage for one fingerprint."""

    root: Path
    stage: str
    key: str
    lock_name: str = ""  # default: the key; another name lets builds of one key run side by side

    @property
    def path(self) -> Path:
        return Path(self.root) / "stages" / self.stage / self.key

    @property
    def lock_path(self) -> Path:
        return Path(self.root) / "locks" / self.stage / f"{self.lock_name or self.key}.lock"

    def complete(self) -> bool:
        return self.path.is_dir() and verify_manifest(self.path, FileHashCache.for_workspace(self.root))[0]

    def verify(self, *, full: bool = False) -> tuple[bool, str]:
        """(ok, why) of the output's manifest: the fast check (the hash cache) or, `full`, a re-hash."""
        if not self.path.is_dir():
            return False, "no output folder"
        return verify_manifest(self.path, FileHashCache.for_workspace(self.root), full=full)

    @contextlib.contextmanager
    def claim(self, on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
        """Hold this output's build lock for the block; yields whether another run held it first.

        When another run holds it, `on_wait("pid N on host H")` is called once and the call
        blocks until that run is done (its lock goes with its process, killed or not)."""
        import fcntl

        lock = self.lock_path
        lock.parent.mkdir(parents=True, exist_ok=True)
        held = (str(lock), threading.get_ident())
        if held in _HELD:
            raise RuntimeError(f"{self.stage} {self.key}: this thread holds its lock already")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            waited = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waited = True
                if on_wait is not None:
                    on_wait(_lock_owner(fd))
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()}).encode(), 0)
            _HELD.add(held)
            try:
                yield waited
            finally:
                _HELD.discard(held)
        finally:
            os.close(fd)  # releases the lock

    def remove_stale_partials(self) -> list[Path]:
        """Remove the `<key>.partial-*` folders whose owner is dead (or is this process, which holds
        the key's lock): only those of this machine; a live run's folder is never touched.
        Call while holding the lock. Returns what was removed."""
        removed = []
        here = socket.gethostname()
        for stale in self.path.parent.glob(f"{self.key}.partial-*"):
            pid, host = _partial_owner(stale.name)
            if pid is None or (host is not None and host != here):
                continue
            if pid == os.getpid() or not pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        return removed

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest()["meta"]

    @contextlib.contextmanager
    def building(self, meta: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield a fresh temporary folder; on success write its manifest and move it into place.

        `meta` (mutable: the caller may add metrics while building) goes into the manifest.
        On an exception the temporary folder is removed and nothing is left under the final name.
        Holds the key's lock (claim()) for the block unless the caller holds it already.
        """
        if (str(self.lock_path), threading.get_ident()) not in _HELD:
            with self.claim():
                with self.building(meta) as tmp:
                    yield tmp
            return
        meta = {} if meta is None else meta
        final = self.path
        final.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale_partials()
        tmp = final.with_name(f"{self.key}.partial-{os.getpid()}@{socket.gethostname()}")
        tmp.mkdir()
        try:
            yield tmp
            meta.setdefault("stage", self.stage)
            meta.setdefault("key", self.key)
            apply_modes(tmp)  # the workspace's permissions, also for what a library made private
            write_json_atomic(tmp / MANIFEST, build_manifest(tmp, meta))
            if final.exists():  # an invalid earlier output: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _lock_owner(fd: int) -> str:
    """Who holds a stage lock, from what its holder wrote into the lock file."""
    for attempt in range(3):
        try:
            owner = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and "pid" in owner:
            return f"pid {owner['pid']} on host {owner.get('host', '?')}"
        time.sleep(0.1)  # the holder may not have written it yet
    return "pid unknown"


def verify_workspace(root: Path, *, full: bool = False) -> list[tuple[str, str, bool, str]]:
    """(stage, key, ok, why) for every output folder under `<root>/stages` (partial folders left
    out), checked against its manifest: the fast path (sizes, and checksums from the hash cache
    while a file's identity holds) or, `full`, every file re-hashed."""
    stages = Path(root) / "stages"
    out = []
    for stage_dir in sorted(p for p in stages.iterdir() if p.is_dir()) if stages.is_dir() else []:
        for folder in sorted(p for p in stage_dir.iterdir() if p.is_dir() and ".partial-" not in p.name):
            ok, why = StageOutput(root, stage_dir.name, folder.name).verify(full=full)
            out.append((stage_dir.name, folder.name, ok, why))
    return out
