"""MemoryState bytes and adapter files: round trips, and a clear error for every kind of bad input."""

import json

import pytest
import torch
from safetensors.torch import save as save_safetensors
from tiny_models import VOCAB, randomize_memory, tiny_model

from deltamem_agents import (
    AdapterError,
    DeltaMemConfig,
    MemoryState,
    MemoryStateError,
    adapter_fingerprint,
    attach_memory,
    memory_parameters,
    new_cache,
)
from deltamem_agents.core.adapter import import_reference_adapter, load_adapter, save_adapter


@pytest.fixture
def written():
    model = tiny_model("llama")
    attach_memory(model, DeltaMemConfig())
    randomize_memory(model)
    cache = new_cache(model)
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 12)), cache=cache)
    return model, cache.memory_state()


def test_bytes_round_trip_exactly(written):
    model, state = written
    data = state.to_bytes()
    back = MemoryState.from_bytes(data, fingerprint=adapter_fingerprint(model))
    assert back.equal(state)
    assert back.layers == (0, 1) and back.tensor.shape == (2, 1, 1, 8, 8)
    assert len(data) < state.nbytes + 400  # one packed tensor: a small header only


def test_bad_bytes_give_clear_errors(written):
    model, state = written
    data = state.to_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "corrupted": b"\xff" * 8 + data[8:],
        "empty": b"",
    }
    for bad in cases.values():
        with pytest.raises(MemoryStateError, match="truncated or corrupted"):
            MemoryState.from_bytes(bad)
    with pytest.raises(MemoryStateError, match="must be bytes"):
        MemoryState.from_bytes("not bytes")
    nan = state.tensor.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(MemoryStateError, match="NaN or Inf"):
        MemoryState.from_bytes(MemoryState(nan, state.fingerprint, state.layers).to_bytes())
    with pytest.raises(MemoryStateError, match="written by adapter"):
        MemoryState.from_bytes(data, fingerprint="0123456789abcdef")
    foreign = save_safetensors({"state": state.tensor}, metadata={"format": "something-else"})
    with pytest.raises(MemoryStateError, match="not a δ-mem memory state"):
        MemoryState.from_bytes(foreign)
    meta = {
        "format": "deltamem-state",
        "version": "1",
        "fingerprint": "x",
        "layers": "[0, 1]",
        "shape": "[2, 1, 1, 4, 4]",
        "dtype": "float32",
    }
    with pytest.raises(MemoryStateError, match="does not match its metadata"):
        MemoryState.from_bytes(save_safetensors({"state": state.tensor}, metadata=meta))
    with pytest.raises(MemoryStateError, match="version"):
        MemoryState.from_bytes(save_safetensors({"state": state.tensor}, metadata={**meta, "version": "9"}))


def test_fingerprint_changes_with_the_weights(written):
    model, _ = written
    before = adapter_fingerprint(model)
    assert adapter_fingerprint(model) == before
    with torch.no_grad():
        next(iter(memory_parameters(model).values())).add_(1e-3)
    assert adapter_fingerprint(model) != before


def test_save_and_load_round_trip(tmp_path, written):
    model, state = written
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path / "adapter")
    for (name, a), (_, b) in zip(memory_parameters(model).items(), memory_parameters(fresh).items()):
        assert torch.equal(a, b), name
    assert adapter_fingerprint(fresh) == adapter_fingerprint(model)
    new_cache(fresh, state)  # states of the saved adapter are accepted by the loaded one


def test_loading_bad_adapters_fails_and_leaves_the_model_unchanged(tmp_path, written):
    model, _ = written
    save_adapter(model, tmp_path / "good")
    fresh = tiny_model("llama")
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(fresh, tmp_path / "nowhere")
    wrong = tmp_path / "wrong"
    save_adapter(model, wrong)
    (wrong / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(fresh, wrong)
    assert not any(".deltamem." in n for n, _ in fresh.named_parameters())
    from safetensors.torch import save_file

    params = {n: p.detach().clone() for n, p in memory_parameters(model).items()}
    params["layers.0.delta_o_proj"] = torch.zeros(3, 3)
    save_file(params, str(wrong / "adapter.safetensors"))
    with pytest.raises(AdapterError, match=r"layers.0.delta_o_proj has shape \(3, 3\)"):
        load_adapter(fresh, wrong)
    assert not any(".deltamem." in n for n, _ in fresh.named_parameters())  # attach was rolled back
    gpt2 = tiny_model("gpt2")
    with pytest.raises(AdapterError, match="trained for backbone"):
        load_adapter(gpt2, tmp_path / "good")


def test_import_reference_format(tmp_path, written):
    model, _ = written
    folder = tmp_path / "reference"
    folder.mkdir()
    reference_config = {
        "rank": 8,
        "alpha": 16.0,
        "num_state_heads": 1,
        "delta_heads": ["q", "o"],
        "memory_write_granularity": "token",
        "beta_bias_init": -1.5,
        "couple_lambda": True,
    }
    (folder / "delta_mem_config.json").write_text(json.dumps(reference_config))
    tensors = {}
    for name, param in memory_parameters(model).items():
        _, index, pname = name.split(".")
        tensors[f"model.layers.{index}.self_attn.{pname}"] = param.detach().clone()
        if pname == "delta_q_proj":
            zeros = torch.zeros(8, 8)  # k/v corrections exist in the file but are zero and unused in Q/O
            tensors[f"model.layers.{index}.self_attn.delta_k_proj"] = zeros
            tensors[f"model.layers.{index}.self_attn.delta_v_proj"] = zeros
    torch.save(tensors, folder / "delta_mem_adapter.pt")
    fresh = tiny_model("llama")
    import_reference_adapter(fresh, folder)
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(ids, cache=new_cache(model)).logits, fresh(ids, cache=new_cache(fresh)).logits)
    (folder / "delta_mem_config.json").write_text(json.dumps({**reference_config, "delta_o_rmsnorm": True}))
    with pytest.raises(AdapterError, match="delta_o_rmsnorm"):
        import_reference_adapter(tiny_model("llama"), folder)


def test_config_errors_name_the_field_and_the_allowed_values():
    from deltamem_agents import ConfigError

    with pytest.raises(ConfigError, match=r"write: Input should be 'token', 'segment' or 'multi'"):
        DeltaMemConfig(write="tokens")
    with pytest.raises(ConfigError, match="rank"):
        DeltaMemConfig(rank=0)
    with pytest.raises(ConfigError, match="layers"):
        DeltaMemConfig(layers=[1, 1])
    assert DeltaMemConfig(write="multi").read_dim == 32 and DeltaMemConfig().scale == 2.0
