"""Content-addressed stage outputs with manifests written last.

A stage's output folder is `<root>/stages/<stage>/<key>`, where the key is a fingerprint of
(its config section, the keys of its inputs, the stage's code version). The folder is built
under a temporary name and renamed into place only after its manifest (file list, sizes,
sha256) is written, so a folder that exists under its final name is complete; a crash leaves
only a `.partial-*` folder that the next run removes. `StageOutput.complete()` re-checks the
manifest against the files, so a corrupted or truncated output is rebuilt, not trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


def build_manifest(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return {"files": files, "meta": meta, "completed_at": time.time()}


def verify_manifest(folder: Path) -> tuple[bool, str]:
    """(True, "") when `folder` has a manifest whose files all exist with their size and checksum."""
    mpath = Path(folder) / MANIFEST
    if not mpath.is_file():
        return False, "no manifest"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return False, f"unreadable manifest: {exc}"
    for rel, info in files.items():
        p = Path(folder) / rel
        if not p.is_file():
            return False, f"missing file {rel}"
        if p.stat().st_size != info["size"] or file_sha256(p) != info["sha256"]:
            return False, f"checksum mismatch in {rel}"
    return True, ""


@dataclass(frozen=True)
class StageOutput:
    """The output folder of one stage for one fingerprint."""

    root: Path
    stage: str
    key: str

    @property
    def path(self) -> Path:
        return Path(self.root) / "stages" / self.stage / self.key

    def complete(self) -> bool:
        return self.path.is_dir() and verify_manifest(self.path)[0]

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
        """
        meta = {} if meta is None else meta
        final = self.path
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f"{self.key}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f"{self.key}.partial-{os.getpid()}")
        tmp.mkdir()
        try:
            yield tmp
            meta.setdefault("stage", self.stage)
            meta.setdefault("key", self.key)
            write_json_atomic(tmp / MANIFEST, build_manifest(tmp, meta))
            if final.exists():  # an invalid earlier output: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
