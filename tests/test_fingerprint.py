"""The state fingerprint covers the adapter's math and weights and every backbone weight, and no speed setting."""

import pytest
import torch
from tiny_chat import tiny_engine

from deltamem_agents import MemoryState, MemoryStateError, adapter_fingerprint
from deltamem_agents.core import memory_layer
from deltamem_agents.core.adapter import load_adapter, save_adapter
from deltamem_agents.core.attach import detach_memory
from deltamem_agents.core.errors import AdapterError
from deltamem_agents.core.fingerprint import MATH_FIELDS, SPEED_FIELDS, math_config
from deltamem_agents.serving.engine import MemoryEngine
from deltamem_agents.serving.write_schedule import write_messages

MESSAGES = [{"role": "user", "content": "my cat is Tom " * 4}, {"role": "assistant", "content": "Tom, noted"}]


@pytest.fixture
def saved(tmp_path):
    engine = tiny_engine()
    state, _ = engine.write(None, MESSAGES)
    save_adapter(engine.model, tmp_path / "adapter")
    return engine, state, tmp_path / "adapter"


def reload(engine: MemoryEngine, folder, **speed) -> MemoryEngine:
    detach_memory(engine.model)
    load_adapter(engine.model, folder, **speed)
    return MemoryEngine(engine.model, engine.tokenizer)


def test_speed_settings_are_not_in_the_fingerprint_and_states_still_load(saved, monkeypatch):
    engine, state, folder = saved
    assert "chunk_size" in SPEED_FIELDS and "chunk_size" not in MATH_FIELDS
    data = state.to_bytes()
    faster = reload(engine, folder, chunk_size=32)  # another chunk size at load time
    assert faster.config.chunk_size == 32
    restored = MemoryState.from_bytes(data, faster.fingerprint(), faster.memory_layers)
    again, _ = faster.write(None, MESSAGES)
    torch.testing.assert_close(again.tensor, restored.tensor, rtol=1e-5, atol=1e-6)  # same math, other schedule
    # the recurrent/chunked threshold, the CPU decode kernel switch, the write piece size and the thread count
    monkeypatch.setattr(memory_layer, "RECURRENT_MAX_TOKENS", 1)
    monkeypatch.setenv("DELTAMEM_CPU_KERNEL", "0")
    faster.write_piece_tokens = 7
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert faster.fingerprint() == state.fingerprint
        MemoryState.from_bytes(data, faster.fingerprint(), faster.memory_layers)
        chunked, _ = faster.write(None, MESSAGES[:1])
        assert chunked.fingerprint == state.fingerprint
    finally:
        torch.set_num_threads(threads)


def test_only_speed_settings_can_be_changed_at_load_time(saved):
    engine, _, folder = saved
    detach_memory(engine.model)
    with pytest.raises(AdapterError, match="not speed settings"):
        load_adapter(engine.model, folder, rank=4)


def test_one_changed_backbone_weight_in_the_last_layer_makes_states_refused(saved):
    engine, state, _ = saved
    data = state.to_bytes()
    assert MemoryState.from_bytes(data, engine.fingerprint(), engine.memory_layers).equal(state)
    last_mlp = engine.model.model.layers[-1].mlp.down_proj.weight
    with torch.no_grad():
        last_mlp[0, 0] += 1e-3  # in place: the fingerprint notices the version counter
    assert engine.fingerprint() != state.fingerprint
    with pytest.raises(MemoryStateError, match="written by adapter"):
        MemoryState.from_bytes(data, engine.fingerprint(), engine.memory_layers)
    with pytest.raises(MemoryStateError):
        write_messages(engine.model, engine.tokenizer, MESSAGES, state)


def test_the_fingerprint_changes_with_the_math_and_the_memory_weights():
    base = tiny_engine()
    other_seed = tiny_engine(seed=1)  # other backbone weights and other memory weights
    assert base.fingerprint() != other_seed.fingerprint()
    assert math_config(base.config)["write"] == "token"
    segment = tiny_engine(write="segment")
    assert segment.fingerprint() != base.fingerprint()
    assert adapter_fingerprint(base.model) == base.fingerprint()


def test_state_bytes_are_checked_against_the_models_layers(saved):
    engine, state, _ = saved
    with pytest.raises(MemoryStateError, match="covers layers"):
        MemoryState.from_bytes(state.to_bytes(), layers=(0,))
    with pytest.raises(MemoryStateError, match="covers layers"):
        MemoryState.from_bytes(state.to_bytes(), engine.fingerprint(), layers=(1,))


def test_the_package_ships_adapter_files_only():
    from deltamem_agents.core.adapter import SHIPPED_ADAPTERS

    # each shipped folder is a memory adapter (weights + config) or a tool-choice head (weights + config), no
    # optimizer or trainer state
    kinds = {
        frozenset({"adapter.safetensors", "deltamem_config.json"}),
        frozenset({"choice_head.safetensors", "choice_head.json"}),
    }
    folders = [d for d in SHIPPED_ADAPTERS.iterdir() if d.is_dir()]
    assert folders and all(frozenset(p.name for p in d.iterdir() if p.is_file()) in kinds for d in folders)
    assert not [p for p in SHIPPED_ADAPTERS.rglob("*") if p.is_file() and p.parent not in folders]


def test_export_adapter_copies_weights_and_config_of_a_checkpoint(tmp_path):
    import torch.optim

    from deltamem_agents.core.adapter import export_adapter_files
    from deltamem_agents.core.attach import memory_parameters
    from deltamem_agents.train.checkpoint import save_checkpoint

    engine = tiny_engine()
    optimizer = torch.optim.AdamW(memory_parameters(engine.model).values())
    checkpoint = tmp_path / "runs" / "tiny"
    save_checkpoint(checkpoint, engine.model, optimizer, {"step": 3, "history": []}, {})
    assert len(list(checkpoint.iterdir())) > 2  # optimizer and trainer state are in the checkpoint
    target = export_adapter_files(checkpoint, "tiny-test", into=tmp_path / "adapters")
    assert sorted(p.name for p in target.iterdir()) == ["adapter.safetensors", "deltamem_config.json"]
    fingerprint = engine.fingerprint()
    detach_memory(engine.model)
    load_adapter(engine.model, target)
    assert MemoryEngine(engine.model, engine.tokenizer).fingerprint() == fingerprint
    with pytest.raises(AdapterError, match="exists"):
        export_adapter_files(checkpoint, "tiny-test", into=tmp_path / "adapters")
    with pytest.raises(AdapterError, match="folder name"):
        export_adapter_files(checkpoint, "../escape", into=tmp_path / "adapters")
