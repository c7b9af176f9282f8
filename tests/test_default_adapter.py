"""``--adapter default``: while no shipped adapter passes rungs 1 and 4, it says so and uses the identity."""

import torch
from tiny_models import tiny_model

from deltamem_agents import detach_memory, has_memory, memory_parameters
from deltamem_agents.core.adapter import save_adapter
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.models.default_adapter import DEFAULT_ADAPTERS, apply_adapter, default_adapter_path


def test_default_is_the_identity_and_says_so():
    assert DEFAULT_ADAPTERS[DEFAULT_BACKBONE] is None and default_adapter_path(DEFAULT_BACKBONE) is None
    model = tiny_model("llama")
    messages = []
    assert apply_adapter(model, "default", DEFAULT_BACKBONE, log=messages.append) is None
    assert len(messages) == 1 and "identity" in messages[0] and "rungs 1 and 4" in messages[0]
    assert has_memory(model)
    corrections = [p for name, p in memory_parameters(model).items() if ".delta_" in name]
    assert corrections and all(float(p.detach().abs().max()) == 0 for p in corrections)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with_memory = model(ids).logits  # tokens write and read the memory inside the call
        detach_memory(model)
        backbone = model(ids).logits
    torch.testing.assert_close(with_memory, backbone, rtol=0, atol=0)


def test_a_folder_is_loaded_and_none_does_nothing(tmp_path):
    source = tiny_model("llama", seed=1)
    apply_adapter(source, "default", DEFAULT_BACKBONE, log=lambda m: None)
    save_adapter(source, tmp_path / "a")
    model = tiny_model("llama", seed=1)
    assert apply_adapter(model, None, DEFAULT_BACKBONE) is None and not has_memory(model)
    assert apply_adapter(model, str(tmp_path / "a"), DEFAULT_BACKBONE) == str(tmp_path / "a")
    assert has_memory(model)
