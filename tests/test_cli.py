"""The `fusion` command line itself: help on every command, the version, usage errors."""
import re
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app
from fusion_core.config import STAGE_NAMES

# What a usage error must not show: a traceback, a Python exception class, pydantic's "Value error,".
PYTHONIC = re.compile(r"Traceback|\b[A-Z]\w*(Error|Exception)\b|Value error")


def _commands(command=None, path=()):
    """(path, click command) of the app and of every command and sub-command under it."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands())


def test_the_walk_reaches_the_server_sub_app():
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"", "run", "validate", "compare", "server", "server start", "server status", "server stop"} <= paths


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "fusion")
def test_help_of_every_command_and_subcommand(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() and "Usage:" in result.output
    assert not PYTHONIC.search(result.output)


def test_every_option_and_argument_has_help():
    missing = [f"{' '.join(path) or 'fusion'} {param.name}" for path, command in COMMANDS
               for param in command.params if not (getattr(param, "help", None) or "").strip()]
    assert not missing, f"without help: {missing}"


def test_version_is_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fusion (llm-fusion) {version('llm-fusion')}"


def test_from_lists_the_stages_and_refuses_any_other_name():
    help_text = " ".join(CliRunner().invoke(app, ["run", "--help"]).output.split())
    assert all(stage in help_text for stage in STAGE_NAMES), help_text
    result = CliRunner().invoke(app, ["run", "pipeline.yaml", "--from", "teacher"])
    assert result.exit_code == 2
    assert "'teacher' is not one of" in result.output and all(stage in result.output for stage in STAGE_NAMES)
    assert not PYTHONIC.search(result.output), result.output


@pytest.mark.parametrize("args", [
    ["run"],                                               # missing argument
    ["run", "pipeline.yaml", "--from", "nope"],            # not a stage
    ["run", "pipeline.yaml", "--no-such-option"],
    ["nosuch"],                                            # no such command
    ["compare", "--format", "xml"],                        # not a format
    ["serve", "--limit", "many"],                          # not a number
    ["compare"],                                           # no config given and no configs/demo.yaml here
    ["server", "stop"],                                    # the same for the servers
], ids=" ".join)
def test_usage_errors_exit_2_without_python_exception_names(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no configs/demo.yaml: a config must be given
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip()
    assert not PYTHONIC.search(result.output), result.output
