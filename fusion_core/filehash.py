"""Content hashes of files, cached by file identity so that a reuse check does not re-read them.

A model's key and a corpus's key cover the bytes of their files (a fast hash: xxh3-128 when
`xxhash` is installed, else blake2b-128); stage manifests record sha256. Hashing tens of GB on
every run would cost minutes, so a digest is kept in a small JSON cache
(`<workspace>/cache/file_hashes.json`) under the file's real path together with its identity
(size, mtime_ns, ctime_ns, inode, device): while the identity is unchanged the cached digest is
used, any change of it (a rewrite in place, even one that restores the mtime, changes ctime)
re-hashes the file. A file modified less than RACY_NS before it was hashed is not trusted from
the cache (a second write within the file system's timestamp granularity would keep its mtime),
as git does with its index. The cache is an optimisation only: an unreadable or unwritable cache
is ignored, and `full=True` re-hashes regardless.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

try:  # ~10x faster than sha256; blake2b (stdlib) otherwise
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency, but the fallback keeps keys possible
    xxhash = None

FAST_ALGO = "xxh3_128" if xxhash is not None else "blake2b"
CACHE_NAME = "file_hashes.json"
CACHE_FORMAT = 1
# A cache entry is trusted only for a file whose mtime is at least this much older than the moment
# it was hashed (2 s: FAT's granularity; ext4 and XFS stamp with the kernel's coarse clock).
RACY_NS = 2_000_000_000
_CHUNK = 1 << 22
# What a folder digest leaves out: version control and editor files, nothing that is loaded.
_IGNORED_NAMES = {".git", ".cache", "__pycache__", ".DS_Store"}


def _hasher(algo: str):
    if algo == "xxh3_128":
        if xxhash is None:
            raise ValueError("xxh3_128 needs the xxhash package")
        return xxhash.xxh3_128()
    if algo == "blake2b":
        return hashlib.blake2b(digest_size=16)
    if algo == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash algorithm {algo!r}")


def hash_file(path: Path | str, algo: str = FAST_ALGO) -> str:
    """Read the whole file and return its hex digest: the one place this module reads bytes."""
    h = _hasher(algo)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileHashCache:
    """Digests of files by real path and identity, loaded lazily and merged into the JSON file
    on save() (under a lock: several runs may share a workspace). `FileHashCache(None)` caches
    in memory only."""

    def __init__(self, path: Path | str | None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, dict[str, Any]] | None = None
        self._dirty: dict[str, dict[str, Any]] = {}

    @classmethod
    def for_workspace(cls, root: Path | str) -> "FileHashCache":
        return cls(Path(root) / "cache" / CACHE_NAME)

    def _read_file(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def _all(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries

    def lookup(self, path: Path | str, algo: str = FAST_ALGO) -> str | None:
        """The cached digest of `path` when its identity is unchanged (and not racy), else None.
        Reads no bytes of the file."""
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError:
            return None
        entry = self._all().get(real)
        if (entry is None or entry.get("id") != _identity(st) or algo not in entry.get("digests", {})
                or entry.get("hashed_at_ns", 0) - st.st_mtime_ns < RACY_NS):
            return None
        return entry["digests"][algo]

    def digest(self, path: Path | str, algo: str = FAST_ALGO, *, full: bool = False) -> str:
        """The digest of `path`: from the cache while its identity holds, else hashed (and cached).
        `full`: hash it whatever the cache says. Raises OSError for an unreadable file."""
        if not full:
            cached = self.lookup(path, algo)
            if cached is not None:
                return cached
        real = os.path.realpath(path)
        before = os.stat(real)
        started = time.time_ns()
        digest = hash_file(real, algo)
        if _identity(os.stat(real)) == _identity(before):  # not changed while it was read
            entry = self._all().get(real)
            digests = dict(entry["digests"]) if entry and entry.get("id") == _identity(before) else {}
            digests[algo] = digest
            new = {"id": _identity(before), "digests": digests, "hashed_at_ns": started}
            self._all()[real] = new
            self._dirty[real] = new
        return digest

    def save(self) -> None:
        """Merge this cache's new entries into its file (entries of vanished files dropped).
        Never raises: a read-only or full workspace only loses the cache."""
        if self.path is None or not self._dirty:
            return
        import fcntl

        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                files = self._read_file()
                files.update(self._dirty)
                files = {p: e for p, e in files.items() if os.path.exists(p)}
                tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps({"format": CACHE_FORMAT, "files": files}, sort_keys=True))
                os.replace(tmp, self.path)
            self._entries = files
            self._dirty = {}


def tree_files(path: Path | str) -> list[Path]:
    """A file, or every regular file under a folder (sorted, symlinks followed, version control
    and cache folders left out)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        if any(part in _IGNORED_NAMES for part in rel) or not p.is_file():
            continue
        out.append(p)
    return out


def tree_digest(path: Path | str, cache: FileHashCache | None = None, algo: str = FAST_ALGO) -> list[list[str]]:
    """[[relative name, digest], ...] of `tree_files(path)`: what a key of a corpus (a file or a
    folder) holds. Raises OSError for a file that cannot be read."""
    cache = cache if cache is not None else FileHashCache(None)
    path = Path(path)
    root = path if path.is_dir() else path.parent
    return [[p.relative_to(root).as_posix(), cache.digest(p, algo)] for p in tree_files(path)]

