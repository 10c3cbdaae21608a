"""Every CLI option has an OFFLOAD_* environment variable, and --help says which."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from offload.cli import main


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Invoking `main` configures the root logger; leave it as the rest of the suite expects."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*path, name))
        if isinstance(command, click.Group):
            found.extend(_commands(command, (*path, name)))
    return found


@pytest.mark.parametrize("path", _commands(main), ids=" ".join)
def test_every_option_names_its_offload_environment_variable_in_help(path: tuple[str, ...]) -> None:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    help_text = " ".join(CliRunner().invoke(main, [*path, "--help"]).output.split())
    options = [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]
    assert help_text.count("env var: OFFLOAD_") >= len(options), help_text


def test_an_environment_variable_sets_an_option(tmp_path: object) -> None:
    result = CliRunner().invoke(main, ["queues"], env={"OFFLOAD_BROKER_URL": "sqlite:////nonexistent/x.db"})
    assert result.exit_code == 1
    assert "/nonexistent" in result.output
