"""Section b: what memory costs the backbone: decode and prefill tokens/s, plain vs TSW vs MSW, and peak memory.

Two copies of the backbone (one plain, one with memory attached), so both sides are measured in the same
process, interleaved token by token for decoding and call by call for prefill.
"""

import copy

import torch
from transformers import DynamicCache

from deltamem_agents import DeltaMemConfig, attach_memory, detach_memory, new_cache
from deltamem_agents.bench.timing import PeakMemory, median, paired_ratio, sync, timed
from deltamem_agents.core.ops import cpu_decode

# (name, config, fused CPU decode kernel): kernel rows time decoding only (prefill does not use the kernel).
VARIANTS = [
    ("TSW", DeltaMemConfig(), False),
    ("TSW", DeltaMemConfig(), True),
    ("MSW", DeltaMemConfig(write="multi"), False),
    ("MSW", DeltaMemConfig(write="multi"), True),
]


def _random_ids(model, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(min(100, vocab // 2), vocab, (1, length), generator=g).to(next(model.parameters()).device)


def _fresh_cache(model, memory: bool):
    return new_cache(model) if memory else DynamicCache(config=model.config)


def _decode_round(plain, memory_model, context: torch.Tensor, steps: int, device) -> tuple[float, float]:
    """Prefill ``context`` into both models (not timed), then time ``steps`` greedy tokens each, interleaved."""
    models = {"plain": (plain, False), "memory": (memory_model, True)}
    caches, tokens, seconds = {}, {}, {"plain": 0.0, "memory": 0.0}
    with torch.no_grad():
        for name, (model, memory) in models.items():
            caches[name] = _fresh_cache(model, memory)
            tokens[name] = model(context, cache=caches[name]).logits[:, -1:].argmax(-1)
        for step in range(steps):
            for name in ("plain", "memory") if step % 2 == 0 else ("memory", "plain"):
                model = models[name][0]
                elapsed, logits = timed(lambda m=model, n=name: m(tokens[n], cache=caches[n]).logits, device)
                tokens[name] = logits[:, -1:].argmax(-1)
                seconds[name] += elapsed
    return seconds["plain"], seconds["memory"]


def _prefill_round(plain, memory_model, prompt: torch.Tensor, device, reverse: bool = False) -> tuple[float, float]:
    """Time one prefill of ``prompt`` on each model (writes on for memory), in the given order."""
    seconds = {}
    sides = [("plain", plain, False), ("memory", memory_model, True)]
    with torch.no_grad():
        for name, model, memory in sides[::-1] if reverse else sides:
            cache = _fresh_cache(model, memory)
            seconds[name], _ = timed(lambda m=model, c=cache: m(prompt, cache=c), device)
    return seconds["plain"], seconds["memory"]


def _peak(model, memory: bool, context: torch.Tensor, steps: int, device) -> int:
    with PeakMemory(device) as peak, torch.no_grad():
        cache = _fresh_cache(model, memory)
        token = model(context, cache=cache).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        sync(device)
    return peak.peak_bytes


def bench_overhead(model, device: torch.device, quick: bool = False, rounds: int | None = None) -> list[dict]:
    """Rows per variant (TSW, MSW): decode and prefill tokens/s, plain vs memory, their ratio, peak memory."""
    context_len, steps, prompt_len = (32, 4, 64) if quick else (256, 32, 512)
    rounds = rounds or (2 if quick else 7)
    memory_model = copy.deepcopy(model)
    context, prompt = _random_ids(model, context_len, 1), _random_ids(model, prompt_len, 2)
    rows = []
    for variant, config, kernel in VARIANTS:
        if kernel and (device.type != "cpu" or not cpu_decode.enable_cpu_decode_kernel(True)):
            continue  # the fused kernel is CPU-only and optional
        attach_memory(memory_model, config)
        try:
            adapter_bytes = sum(
                p.numel() * p.element_size() for n, p in memory_model.named_parameters() if ".deltamem." in f".{n}"
            )
            _decode_round(model, memory_model, context, 2, device)  # warm-up
            decode = [_decode_round(model, memory_model, context, steps, device) for _ in range(rounds)]
            measured = [("decode", decode, steps)]
            if not kernel:
                _prefill_round(model, memory_model, prompt, device)  # warm-up
                prefill = [_prefill_round(model, memory_model, prompt, device, i % 2 == 1) for i in range(rounds)]
                measured.append(("prefill", prefill, prompt_len))
            peak_plain = _peak(model, False, context, steps, device)
            peak_memory = _peak(memory_model, True, context, steps, device)
        finally:
            detach_memory(memory_model)
            cpu_decode.enable_cpu_decode_kernel(False)
        for metric, pairs, tokens in measured:
            plain_s, memory_s = [p for p, _ in pairs], [m for _, m in pairs]
            rows.append(
                {
                    "variant": variant,
                    "path": "fused CPU kernel" if kernel else "torch",
                    "metric": metric,
                    "tokens": tokens,
                    "context": context_len if metric == "decode" else 0,
                    "plain_tok_s": tokens / median(plain_s),
                    "memory_tok_s": tokens / median(memory_s),
                    "ratio": paired_ratio(plain_s, memory_s),
                    "runs": rounds,
                    "adapter_bytes": adapter_bytes,
                    "peak_plain_bytes": peak_plain,
                    "peak_memory_bytes": peak_memory,
                }
            )
            row = rows[-1]
            print(
                f"  overhead {variant} ({row['path']}) {metric:7s} plain {row['plain_tok_s']:8.1f} tok/s  memory "
                f"{row['memory_tok_s']:8.1f} tok/s  ratio {row['ratio']:.3f}",
                flush=True,
            )
    del memory_model
    return rows
