"""A short memory demo on the embedded backbone: write a conversation into δ-mem, save and restore the state,
and answer a question with the history only in memory.

The adapter here is freshly initialised (untrained), so the demo shows the mechanics — state size, speed, exact
save/restore, identity with writes off — not recall quality; trained adapters are shipped separately.
"""

import time

import torch

from deltamem_agents import DeltaMemConfig, MemoryState, adapter_fingerprint, attach_memory, new_cache
from deltamem_agents.models.backbone_zoo import DEFAULT_BACKBONE, load_backbone

HISTORY = [
    {"role": "user", "content": "Hi, I'm Dana. My order number is 4417 and the blender arrived cracked."},
    {"role": "assistant", "content": "Sorry to hear that, Dana. I've noted order 4417 with a cracked blender."},
    {"role": "user", "content": "Please send the replacement to my office on Pine Street."},
    {"role": "assistant", "content": "Done: the replacement will go to your office on Pine Street."},
]
QUESTION = [{"role": "user", "content": "Where should the replacement go?"}]


def run_demo(backbone: str = DEFAULT_BACKBONE, max_new_tokens: int = 24, seed: int = 0) -> dict:
    """Run the demo, print what happens, and return the numbers."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, tokenizer = load_backbone(backbone)
    print(
        f"backbone {backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
        f"loaded in {time.perf_counter() - t0:.1f}s on {next(model.parameters()).device}"
    )
    attach_memory(model, DeltaMemConfig())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"δ-mem attached: TSW, r=8, {trainable:,} memory parameters, adapter {adapter_fingerprint(model)}")

    history = tokenizer.apply_chat_template(HISTORY, return_tensors="pt", return_dict=True)["input_ids"]
    cache = new_cache(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(history.to(model.device), cache=cache)
    write_s = time.perf_counter() - t0
    state = cache.memory_state()
    data = state.to_bytes()
    print(
        f"write pass: {history.shape[1]} history tokens in {write_s * 1000:.0f} ms -> state of "
        f"{state.nbytes:,} bytes ({len(data):,} serialized) for {len(state.layers)} layers"
    )
    restored = MemoryState.from_bytes(data, fingerprint=adapter_fingerprint(model))
    assert restored.equal(state), "restored state differs"
    print("state round-trips through bytes exactly")

    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ].to(model.device)
    answers = {}
    for label, memory in (("empty memory", None), ("with memory", restored)):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                cache=new_cache(model, memory, writes=False),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
        answers[label] = text
        print(f"{label:>13} ({time.perf_counter() - t0:.1f}s, prompt {prompt.shape[1]} tokens): {text!r}")
    print("(untrained adapter: the memory changes the model's internals, recall needs a trained adapter)")
    return {"history_tokens": history.shape[1], "write_seconds": write_s, "state_bytes": len(data), "answers": answers}
