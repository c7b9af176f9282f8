"""Every ``deltamem`` subcommand and every argument says what it is for in ``--help``."""

import argparse

import pytest

from deltamem_agents.apps.cli import build_parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str | None]]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    return {name: (sub, helps.get(name)) for name, sub in action.choices.items()}


COMMANDS = subcommands(build_parser())


def test_the_cli_has_its_subcommands():
    assert {"demo", "chat", "train", "eval", "bench", "bench-load", "export-adapter", "inspect-state"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_and_argument_has_help(name, capsys):
    sub, summary = COMMANDS[name]
    assert summary, f"`deltamem {name}` has no one-line help in `deltamem --help`"
    assert sub.description, f"`deltamem {name} --help` has no description"
    missing = [a.dest for a in sub._actions if a.help in (None, "", argparse.SUPPRESS)]
    assert not missing, f"`deltamem {name}` arguments without help: {missing}"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert " ".join(sub.description.split()[:3]) in " ".join(printed.split())
