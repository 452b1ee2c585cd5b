"""teacher.task_runner: which Prefect task runner scores the shards, and its bad values."""
from pathlib import Path

import pytest

from fusion_core.config import ConfigError, TeacherConfig, load_config
from fusion_core.errors import FusionError
from tasks.teacher_inference import task_runner


def test_named_runners_are_built_with_the_configured_workers():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    threads = task_runner(TeacherConfig(workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    processes = task_runner(TeacherConfig(task_runner="processes", workers=2, threads=1))
    assert isinstance(processes, ProcessPoolTaskRunner) and processes._max_workers == 2
    assert processes._initargs == (1,)  # torch threads per worker process
    imported = task_runner(TeacherConfig(task_runner="prefect.task_runners:ThreadPoolTaskRunner",
                                         task_runner_options={"max_workers": 5}))
    assert type(imported) is ThreadPoolTaskRunner and imported._max_workers == 5


@pytest.mark.parametrize("name, options, message", [
    ("no_such_module:Runner", {}, r"teacher.task_runner: cannot import 'no_such_module:Runner'"),
    ("collections:OrderedDict", {}, r"'collections:OrderedDict' is not a Prefect TaskRunner class"),
    ("prefect.task_runners:ThreadPoolTaskRunner", {"cores": 2}, r"teacher.task_runner_options do not fit"),
])
def test_a_runner_that_cannot_be_built_is_named(name, options, message):
    with pytest.raises(FusionError, match=message):
        task_runner(TeacherConfig(task_runner=name, task_runner_options=options))


def test_a_malformed_runner_name_is_a_config_error(tmp_path: Path, tiny_models):
    from conftest import write_tiny_pipeline

    path = write_tiny_pipeline(tmp_path, tiny_models, **{"teacher.task_runner": "dask"})
    with pytest.raises(ConfigError, match=r"1 problem\(s\)\n  teacher.task_runner: must be 'threads', "
                                          r"'processes' or 'module:Class' of a Prefect TaskRunner .*not 'dask'"):
        load_config(path)
