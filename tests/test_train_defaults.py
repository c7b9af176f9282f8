"""Defaults live in one place: `deltamem train` with no flags is train(TrainConfig()); recipes are named configs."""

import argparse

from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.train.cli import add_train_parser, config_from_args
from deltamem_agents.train.recipes import RECIPES
from deltamem_agents.train.trainer import TrainConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def without_progress(config: TrainConfig) -> dict:
    values = config.model_dump()
    values.pop("progress")
    return values


def test_the_command_line_without_flags_is_the_default_train_config():
    config = config_from_args(parse())
    assert without_progress(config) == without_progress(TrainConfig())
    assert config.memory == DeltaMemConfig()  # the paper's adapter: tied gate, beta bias -1.5
    assert config.backbone == DEFAULT_BACKBONE


def test_flags_override_the_default_and_the_recipe():
    config = config_from_args(parse("--lr", "0.02", "--write", "segment", "--forget-gate", "separate"))
    assert config.lr == 0.02 and config.memory.write == "segment" and config.memory.forget_gate == "separate"
    recipe = RECIPES["smollm2-135m-ssw"]
    from_recipe = config_from_args(parse("--recipe", "smollm2-135m-ssw"))
    assert without_progress(from_recipe) == without_progress(recipe)
    tweaked = config_from_args(parse("--recipe", "smollm2-135m-ssw", "--steps", "7"))
    assert tweaked.steps == 7 and tweaked.memory == recipe.memory and tweaked.lr == recipe.lr


def test_help_names_every_default():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    add_train_parser(commands)
    text = commands.choices["train"].format_help()
    assert f"(default: {TrainConfig().lr!r})" in text and "(default: 'tied')" in text
