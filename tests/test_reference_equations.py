"""TSW, SSW and MSW inside a real (tiny) model match an independent, slow float64 implementation of
METHOD.md's equations, written here with plain loops over tokens, heads and rows."""

import copy

import pytest
import torch
from tiny_models import VOCAB, randomize_memory, tiny_model

from deltamem_agents import DeltaMemConfig, attach_memory, memory_parameters, new_cache


def l2norm(x):
    return x / x.norm().clamp_min(1e-6)


def vectors(p, x, heads, rank):
    """q, k, v, beta for one position x (d,), split into heads: lists of (r,) float64 tensors."""
    out = []
    q = torch.tanh(p["memory_q_proj"] @ x)
    k = torch.tanh(p["memory_k_proj"] @ x)
    v = p["memory_v_proj"] @ x
    beta = torch.sigmoid(p["beta_proj"] @ x + p["beta_bias"])
    for h in range(heads):
        part = slice(h * rank, (h + 1) * rank)
        out.append((l2norm(q[part]), l2norm(k[part]), v[part], beta[part]))
    return out


def write(state, q, k, v, beta):
    """S <- diag(1 - beta) S + diag(beta) (v - S k) k^T, row by row."""
    new = state.clone()
    for i in range(state.shape[0]):
        error = v[i] - state[i] @ k
        new[i] = (1 - beta[i]) * state[i] + beta[i] * error * k
    return new


def reference_run(backbone, params, config, ids, segment_ids=None):
    """Logits and final states with hooks that implement the equations directly (batch of one)."""
    heads, rank, scale = config.num_heads, config.rank, config.alpha / config.rank
    states = {i: [torch.zeros(rank, rank, dtype=torch.float64) for _ in range(heads)] for i in params}
    reads = {}
    handles = []
    for index, layer in enumerate(backbone.model.layers):
        p = {name: t.double() for name, t in params[index].items()}

        def pre(module, args, kwargs, index=index, p=p):
            x = kwargs["hidden_states"][0].double()  # (T, d)
            rows = []
            before = [s.clone() for s in states[index]]
            for t in range(x.shape[0]):
                per_head = vectors(p, x[t], heads, rank)
                read = []
                for h, (q, k, v, beta) in enumerate(per_head):
                    source = before[h] if config.write == "segment" else states[index][h]
                    read.append(source @ q)  # read BEFORE the write
                    if config.write != "segment":
                        states[index][h] = write(states[index][h], q, k, v, beta)
                rows.append(torch.cat(read))
            if config.write == "segment":
                for seg in sorted(set(segment_ids.tolist()) - {-1}):
                    mean = x[segment_ids == seg].mean(0)
                    q, k, v, beta = vectors(p, mean, heads, rank)[0]
                    states[index][0] = write(states[index][0], q, k, v, beta)
            reads[index] = torch.stack(rows)  # (T, R)

        def add(name, index=index, p=p):
            def hook(module, args, output):
                delta = scale * reads[index] @ p[f"delta_{name}_proj"].T
                return output + delta.to(output.dtype)[None]

            return hook

        attention = layer.self_attn
        handles += [
            attention.register_forward_pre_hook(pre, with_kwargs=True),
            attention.q_proj.register_forward_hook(add("q")),
            attention.o_proj.register_forward_hook(add("o")),
        ]
    try:
        with torch.no_grad():
            logits = backbone(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, states


@pytest.mark.parametrize("write_strategy", ["token", "segment", "multi"])
def test_model_matches_the_equations(write_strategy):
    model = tiny_model("llama").double()
    backbone = copy.deepcopy(model)
    config = DeltaMemConfig(write=write_strategy, chunk_size=4)
    attach_memory(model, config, dtype=torch.float64)
    randomize_memory(model, seed=3)
    params = {}
    for name, param in memory_parameters(model).items():
        _, index, pname = name.split(".")
        params.setdefault(int(index), {})[pname] = param.detach()
    ids = torch.randint(3, VOCAB, (1, 19), generator=torch.Generator().manual_seed(4))
    segments = torch.tensor([-1] * 3 + [0] * 5 + [1] * 7 + [2] * 3 + [-1])
    with torch.no_grad():
        cache = new_cache(model)
        cache.set_segment_ids(segments[None])
        got = model(ids, cache=cache).logits
    expected, states = reference_run(backbone, params, config, ids, segments)
    assert torch.allclose(got, expected, atol=1e-9)
    memory = cache.memory_state().tensor.double()  # (L, 1, H, r, r)
    for index in params:
        for h in range(config.num_heads):
            assert torch.allclose(memory[index, 0, h], states[index][h], atol=1e-5)
