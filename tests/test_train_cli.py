"""Slow: `deltamem train` on the embedded backbone runs, checkpoints, and resumes from the saved step."""

import json

import pytest

from deltamem_agents.apps.cli import main

pytestmark = pytest.mark.slow


def test_train_command_checkpoints_and_resumes(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    args = ["train", "--steps", "2", "--batch-size", "2", "--curriculum", "0:1", "--write", "segment"]
    args += ["--checkpoint-dir", str(checkpoint), "--dev-episodes", "0", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0  # already finished: resumes at step 2 and stops there
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert (checkpoint / "adapter.safetensors").stat().st_size > 100_000
