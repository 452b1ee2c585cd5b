"""The lm-eval tasks shipped with the project, one or more per demo domain.

lm-eval wants absolute data paths in a task's YAML, so the package keeps templates
(`templates/<task>.yaml.tmpl`, data files named relative to `data/`) and `materialize_tasks`
writes a ready folder: the YAMLs with absolute paths and a copy of the data beside them.
That folder is what `TaskManager(include_path=...)` takes, and it is self-contained (it can be
logged as an artifact and reused). `make_data.py` regenerates the data deterministically.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
DATA_DIR = PACKAGE_DIR / "data"

# Task name -> demo domain it measures.
BUNDLED_TASKS: dict[str, str] = {
    "fusion_prose_mc": "prose",
    "fusion_code_mc": "code",
    "fusion_arith_gen": "arithmetic",
    "fusion_arith_mc": "arithmetic",
}
# lm-eval tag naming all bundled tasks at once.
BUNDLED_TAG = "fusion_bundled"


def materialize_tasks(out_dir: Path) -> Path:
    """Write the bundled tasks into `out_dir` (YAMLs with absolute data paths + data/*.jsonl).

    Returns the folder to pass as lm-eval's `include_path` (`out_dir` itself, absolute).
    Rewrites the same files on every call, so it is safe to repeat; other files in `out_dir`
    are left alone. Raises FileNotFoundError if a template or data file is missing.
    """
    import yaml

    dumper = _readable_dumper()
    out_dir = Path(out_dir).resolve()
    data_out = out_dir / "data"
    data_out.mkdir(parents=True, exist_ok=True)
    for task in BUNDLED_TASKS:
        template = TEMPLATES_DIR / f"{task}.yaml.tmpl"
        config = yaml.safe_load(template.read_text(encoding="utf-8"))
        files = config["dataset_kwargs"]["data_files"]
        for split, name in files.items():
            src = DATA_DIR / name
            if not src.is_file():
                raise FileNotFoundError(f"data file {src} of bundled task {task} is missing "
                                        "(python -m fusion_core.eval_tasks.make_data writes it)")
            dst = data_out / name
            _copy_atomic(src, dst)
            files[split] = str(dst)
        text = yaml.dump(config, Dumper=dumper, sort_keys=False, allow_unicode=True)
        _write_atomic(out_dir / f"{task}.yaml", text)
    return out_dir


def _readable_dumper():
    import yaml

    class ReadableDumper(yaml.SafeDumper):
        """Writes strings holding control characters double-quoted ("\\n"), not folded over lines."""

    def represent_str(dumper, value):
        style = '"' if any(c in value for c in "\n\r\t") else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    ReadableDumper.add_representer(str, represent_str)
    return ReadableDumper


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
