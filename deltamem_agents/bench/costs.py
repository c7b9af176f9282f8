"""Section costs: what memory costs, as the ratios of issue 14, measured side by side in one process.

- decode, read only: the chat's decode path (a state written from the context, then greedy tokens with writes
  off), memory tokens/s / plain tokens/s;
- decode, TSW writes on (``generate()`` with writes on);
  both by default (the fused CPU kernel when it is built) and, in the same rounds, with the kernel off (pure
  torch: what a user without the built kernel gets), as the rows "... (pure torch)";
- prefill: a 512-token write (TSW), memory / plain;
- scan: the chunked scan's speed-up over the token loop at T = 2048, H = 1 and H = 4, forward and backward.

Both sides of every ratio are measured in the same round, alternating order (decode: token by token).
"""

import contextlib
import copy

import torch
from transformers import DynamicCache

from deltamem_agents import DeltaMemConfig, attach_memory, new_cache
from deltamem_agents.bench.scan import time_scans
from deltamem_agents.bench.timing import median, paired_ratio, timed
from deltamem_agents.core.ops import cpu_decode

TARGETS = {
    "decode read-only": 0.97,
    "decode TSW writes on": 0.95,
    "prefill 512 write": 0.95,
    "scan H=1 forward": 20.0,
    "scan H=1 forward+backward": 20.0,
    "scan H=4 forward": 20.0,
    "scan H=4 forward+backward": 20.0,
}


def _ids(model, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(min(100, vocab // 2), vocab, (1, length), generator=g).to(next(model.parameters()).device)


@contextlib.contextmanager
def _cpu_kernel(enabled: bool):
    """The fused CPU decode kernel on (when built) or off inside the block, the caller's setting after it."""
    before = cpu_decode._enabled
    cpu_decode.enable_cpu_decode_kernel(enabled and before)
    try:
        yield
    finally:
        cpu_decode.enable_cpu_decode_kernel(before)


def _decode_round(plain, memory, context, steps: int, read_only: bool, device) -> dict[str, float]:
    """Prefill ``context`` on every side (memory: writes on), then time ``steps`` greedy tokens each, interleaved
    token by token with the order rotating. Sides: ``plain``, ``memory`` (default paths) and ``torch`` (the same
    memory with the CPU kernel off). Returns the seconds per side."""
    sides = {"plain": (plain, True), "memory": (memory, True), "torch": (memory, False)}
    caches = {name: new_cache(memory, writes=True) for name in ("memory", "torch")}
    caches["plain"] = DynamicCache(config=plain.config)
    seconds, tokens, names = dict.fromkeys(sides, 0.0), {}, list(sides)
    with torch.no_grad():
        for name, (model, kernel) in sides.items():
            with _cpu_kernel(kernel):
                tokens[name] = model(context, cache=caches[name]).logits[:, -1:].argmax(-1)
        for name in ("memory", "torch"):
            caches[name].memory_writes = not read_only
        for step in range(steps):
            for name in names[step % 3 :] + names[: step % 3]:
                (model, kernel), cache = sides[name], caches[name]
                with _cpu_kernel(kernel):
                    elapsed, logits = timed(lambda m=model, c=cache, n=name: m(tokens[n], cache=c).logits, device)
                tokens[name] = logits[:, -1:].argmax(-1)
                seconds[name] += elapsed
    return seconds


def _prefill_round(plain, memory, prompt, device, reverse: bool) -> tuple[float, float]:
    sides = [("plain", plain), ("memory", memory)]
    seconds = {}
    with torch.no_grad():
        for name, model in sides[::-1] if reverse else sides:
            cache = DynamicCache(config=plain.config) if name == "plain" else new_cache(memory, writes=True)
            seconds[name], _ = timed(lambda m=model, c=cache: m(prompt, cache=c), device)
    return seconds["plain"], seconds["memory"]


def _trained_like(model) -> None:
    """Non-zero gates and corrections, so every path does its real work (an untrained adapter has W_beta = 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".deltamem." in f".{name}":
                param.add_(0.02 * torch.randn(param.shape, generator=g).to(param.device, param.dtype))


def bench_costs(model, device: torch.device, quick: bool = False, rounds: int | None = None) -> list[dict]:
    """One row per measured ratio (``name``, ``ratio``, ``target``, ``met``, the two sides' rates)."""
    context_len, steps, prompt_len, length = (32, 4, 64, 256) if quick else (256, 48, 512, 2048)
    rounds = rounds or (2 if quick else 5)
    # Both sides are copies: a loaded model and a deep copy can differ in speed by a few % (memory placement),
    # which would otherwise be charged to the memory.
    plain, memory = copy.deepcopy(model), attach_memory(copy.deepcopy(model), DeltaMemConfig())
    _trained_like(memory)
    context, prompt = _ids(model, context_len, 1), _ids(model, prompt_len, 2)
    rows = []

    def add(name: str, ratio: float, plain_rate: float, memory_rate: float, unit: str, detail: str) -> None:
        key = name if not quick else name.replace("prefill 512", f"prefill {prompt_len}")
        target = TARGETS.get(name)
        rows.append(
            {
                "name": key,
                "ratio": ratio,
                "target": target,
                "met": None if target is None else bool(ratio >= target),
                "baseline_rate": plain_rate,
                "memory_rate": memory_rate,
                "unit": unit,
                "detail": detail,
                "runs": rounds,
            }
        )
        print(f"  costs {key:26s} {ratio:7.3f}  (target {target}; {detail})", flush=True)

    kernel = "CPU kernel" if cpu_decode.kernel() is not None else "pure torch: CPU kernel not built or off"
    for name, read_only in (("decode read-only", True), ("decode TSW writes on", False)):
        _decode_round(plain, memory, context, 2, read_only, device)  # warm-up
        runs = [_decode_round(plain, memory, context, steps, read_only, device) for _ in range(rounds)]
        plain_s = [run["plain"] for run in runs]
        for side, label, how in (("memory", name, kernel), ("torch", f"{name} (pure torch)", "kernel off")):
            memory_s = [run[side] for run in runs]
            add(
                label,
                paired_ratio(plain_s, memory_s),
                steps / median(plain_s),
                steps / median(memory_s),
                "tok/s",
                f"{steps} greedy tokens after {context_len}, plain {steps / median(plain_s):.1f} tok/s; {how}",
            )
    _prefill_round(plain, memory, prompt, device, False)  # warm-up
    pairs = [_prefill_round(plain, memory, prompt, device, i % 2 == 1) for i in range(rounds)]
    plain_s, memory_s = [p for p, _ in pairs], [m for _, m in pairs]
    add(
        "prefill 512 write",
        paired_ratio(plain_s, memory_s),
        prompt_len / median(plain_s),
        prompt_len / median(memory_s),
        "tok/s",
        f"{prompt_len} tokens, plain {prompt_len / median(plain_s):.0f} tok/s",
    )
    del plain, memory
    for heads in (1, 4):
        for backward in (False, True):
            seconds = time_scans(length, heads, backward, device, rounds)
            label = "forward+backward" if backward else "forward"
            loop, chunked = median(seconds["recurrent"]), median(seconds["chunked"])
            add(
                f"scan H={heads} {label}",
                paired_ratio(seconds["recurrent"], seconds["chunked"]),
                length / loop,
                length / chunked,
                "tok/s",
                f"T={length}: loop {loop * 1e3:.1f} ms, chunked {chunked * 1e3:.2f} ms",
            )
    return rows


def costs_table(rows: list[dict]) -> str:
    """The rows as one markdown table: measured ratio beside its target."""
    lines = ["| ratio | measured | target | met | detail |", "|---|---|---|---|---|"]
    for row in rows:
        unit = "×" if row["name"].startswith("scan") else ""
        target = "" if row["target"] is None else f"≥ {row['target']:g}{unit}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['name']} | {row['ratio']:.3f}{unit} | {target} | {met} | {row['detail']} |")
    return "\n".join(lines)
