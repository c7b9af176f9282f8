"""``deltamem bench --quick`` runs end to end on a tiny random model and writes its files; its pieces are right."""

import json

import pytest
import torch
from tiny_chat import CHATML_PLAIN, char_level_tokenizer
from tiny_models import tiny_model
from transformers import DynamicCache

from deltamem_agents.apps.cli import main
from deltamem_agents.bench import run_bench
from deltamem_agents.bench.timing import alternate, paired_ratio
from deltamem_agents.bench.turns import _crop_to, kv_cache_bytes, scripted_conversation


def char_tokenizer(vocab_size: int):
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:'"
    return char_level_tokenizer(chars, CHATML_PLAIN, vocab_size=vocab_size)


def test_the_costs_section_prints_every_ratio_beside_its_target(tmp_path, capsys):
    model = tiny_model("llama")
    results = run_bench(tmp_path, quick=True, sections=("costs",), model=model, tokenizer=None, threads=None)
    rows = results["sections"]["costs"]
    assert [r["name"] for r in rows] == [
        "decode read-only",
        "decode read-only (pure torch)",
        "decode TSW writes on",
        "decode TSW writes on (pure torch)",
        "prefill 64 write",
        *(f"scan H={h} {p}" for h in (1, 4) for p in ("forward", "forward+backward")),
    ]
    compared = [r for r in rows if not r["name"].endswith("(pure torch)")]
    assert all(r["ratio"] > 0 and r["target"] and isinstance(r["met"], bool) for r in compared)
    assert all(r["ratio"] > 0 and r["target"] is None for r in rows if r not in compared)  # the comparison rows
    printed = capsys.readouterr().out
    assert "machine:" in printed and "| decode read-only |" in printed  # one table, with the machine
    assert "## Costs" in (tmp_path / "results-quick.md").read_text()


@pytest.mark.parametrize("sections", [("scan", "overhead", "turns", "checkpoints")])
def test_quick_bench_runs_end_to_end_and_writes_its_files(tmp_path, sections):
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096  # the scripted turns' prompts are longer than the tiny default 256
    tokenizer = char_tokenizer(model.config.vocab_size)
    results = run_bench(
        tmp_path, quick=True, sections=sections, model=model, tokenizer=tokenizer, turns=3, threads=None
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "results-quick.json",
        "results-quick.md",
        "scan-quick.png",
        "overhead-quick.png",
        "turns-quick.png",
    } <= names
    saved = json.loads((tmp_path / "results-quick.json").read_text())
    assert saved["quick"] is True and saved["machine"]["device"] == "cpu" and saved["machine"]["torch"]
    assert set(saved["sections"]) == set(sections)
    scan = saved["sections"]["scan"]
    assert {(r["T"], r["H"], r["pass"]) for r in scan} == {
        (t, h, p) for t in (64, 256) for h in (1, 4) for p in ("forward", "forward+backward")
    }
    assert all(r["speedup"] > 0 and r["chunked_tok_s"] > 0 for r in scan)
    overhead = saved["sections"]["overhead"]
    assert {(r["variant"], r["metric"]) for r in overhead if r["path"] == "torch"} == {
        (v, m) for v in ("TSW", "MSW") for m in ("decode", "prefill")
    }
    turns = saved["sections"]["turns"]
    assert [r["turn"] for r in turns["per_turn"]] == [1, 2, 3]
    last = turns["per_turn"][-1]
    assert last["mem_write_tokens"] > 0 and last["state_bytes"] > 0 and last["kv_bytes"] > 0
    assert last["replay_prompt_tokens"] > turns["per_turn"][0]["replay_prompt_tokens"]
    checkpoints = saved["sections"]["checkpoints"]
    assert [r["state"] for r in checkpoints] == ["TSW", "MSW"]
    assert checkpoints[0]["checkpoint_blob_bytes"] >= checkpoints[0]["state_bytes"]
    markdown = (tmp_path / "results-quick.md").read_text()
    assert "torch " in markdown and "## Scan" in markdown and "## Checkpoints" in markdown
    assert results["sections"].keys() == saved["sections"].keys()


def test_cli_rejects_unknown_sections(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--sections", "scan,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_alternate_rotates_the_order_and_pairs_rounds():
    calls = []
    seconds = alternate({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # one warm-up round, then rotating
    assert seconds == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert paired_ratio(seconds["b"], seconds["a"]) == 2.0


def test_scripted_conversation_and_kv_helpers():
    script = scripted_conversation(5)
    assert [m["role"] for m in script] == ["user", "assistant"] * 5
    assert len({m["content"] for m in script}) == 10
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.arange(3, 13)[None], cache=cache)
    per_token = kv_cache_bytes(cache) / 10
    assert per_token == 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 8 * 4
    _crop_to(cache, 6)
    assert cache.get_seq_length() == 6 and kv_cache_bytes(cache) == 6 * per_token
