"""Training of a tool-choice adapter (``serving.choice_adapter``) on generated requests over many tool sets.

The data (``deltamem_agents/train/data/tool_sets.json``) holds tool sets of domains that the request set of
``examples/ticketing_bot/requests.json`` does not have (no tickets, calendars, shops or smart homes), requests per
tool, off-topic messages per domain and general messages that need a plain reply. An example is one turn: a
domain's system message, a random subset of its tools (sometimes with tools of other domains mixed in), in random
order, the reply listed or not, and one message; the target is the right action's label
(``tool_choice.listing_example``). The loss is the cross-entropy of the label tokens with the adapter active on
the frozen backbone. Whole domains are held out as the dev set, scored the way the chat scores.
"""

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltamem_agents.serving.choice_adapter import ChoiceAdapter
from deltamem_agents.serving.tool_choice import REPLY_ACTION, listing_example
from deltamem_agents.serving.tool_grammar import ToolSpec

TOOL_SETS = Path(__file__).with_name("data") / "tool_sets.json"


@dataclass(frozen=True)
class ChoiceExample:
    """One turn: the chat dicts (system, user), the listed options (None: the reply) and the right one."""

    messages: list
    options: list
    answer: ToolSpec | None

    @property
    def answer_name(self) -> str:
        return self.answer.name if self.answer is not None else REPLY_ACTION


@dataclass
class ChoiceTrainConfig:
    """Settings of :func:`train_choice_adapter` (all recorded in the adapter's info)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("q_proj", "v_proj", "o_proj")
    reply_share: float = 0.3  # share of examples whose answer is the reply
    reply_listed: float = 0.7  # share of tool examples that also list the reply (auto) rather than not (any)
    foreign_tools: float = 0.3  # share of examples with 1-2 tools of other domains mixed in
    dev_domains: int = 3  # whole domains kept out of training, for the dev accuracy
    dev_every: int = 100
    dev_limit: int = 60  # dev items scored each time (a fixed, seeded sample of the dev domains' items)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def load_tool_sets(path=TOOL_SETS) -> dict:
    """``{"domains": {name: {"system", "tools": [ToolSpec], "requests": {tool: [text]}, "off_topic"}},
    "replies": [text]}`` with every request's tool checked against its domain's tools."""
    data = json.loads(Path(path).read_text())
    domains = {}
    for name, spec in data["domains"].items():
        tools = [ToolSpec(t["name"], t.get("description", ""), t.get("parameters") or {}) for t in spec["tools"]]
        known = {t.name for t in tools}
        unknown = set(spec["requests"]) - known
        if unknown:
            raise ValueError(f"{path}: domain {name!r} has requests for unknown tools {sorted(unknown)}")
        domains[name] = {**spec, "tools": tools}
    return {"domains": domains, "replies": list(data["replies"])}


def split_domains(data: dict, dev_domains: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train domain names, dev domain names): ``dev_domains`` whole domains, drawn with ``seed``."""
    names = sorted(data["domains"])
    dev = sorted(random.Random(seed).sample(names, dev_domains)) if dev_domains else []
    return [n for n in names if n not in dev], dev


def make_example(data: dict, domains: list[str], rng: random.Random, cfg: ChoiceTrainConfig) -> ChoiceExample:
    """One random turn over ``domains`` (see the module docstring)."""
    name = rng.choice(domains)
    domain = data["domains"][name]
    tools = domain["tools"]
    is_reply = rng.random() < cfg.reply_share
    if is_reply:
        pool = domain.get("off_topic") or []
        text = rng.choice(pool) if pool and rng.random() < 0.5 else rng.choice(data["replies"])
        answer = None
    else:
        answer = rng.choice([t for t in tools if domain["requests"].get(t.name)])
        text = rng.choice(domain["requests"][answer.name])
    size = rng.randint(min(3, len(tools)), len(tools))
    chosen = rng.sample([t for t in tools if t is not answer], size - (answer is not None))
    options: list = chosen + ([answer] if answer is not None else [])
    if rng.random() < cfg.foreign_tools:
        others = [t for n in domains if n != name for t in data["domains"][n]["tools"]]
        taken = {t.name for t in options}
        options += [t for t in rng.sample(others, rng.randint(1, 2)) if t.name not in taken]
    rng.shuffle(options)
    if is_reply or rng.random() < cfg.reply_listed:
        options.insert(rng.randint(0, len(options)), None)
    messages = [{"role": "system", "content": domain["system"]}, {"role": "user", "content": text}]
    return ChoiceExample(messages, options, answer)


def dev_examples(data: dict, domains: list[str]) -> list[ChoiceExample]:
    """Every request and off-topic message of ``domains`` with all the domain's tools and the reply listed."""
    out = []
    for name in domains:
        domain = data["domains"][name]
        options = [*domain["tools"], None]
        system = {"role": "system", "content": domain["system"]}
        by_name = {t.name: t for t in domain["tools"]}
        for tool, texts in domain["requests"].items():
            out += [ChoiceExample([system, {"role": "user", "content": t}], options, by_name[tool]) for t in texts]
        out += [ChoiceExample([system, {"role": "user", "content": t}], options, None) for t in domain["off_topic"]]
    return out


def label_loss(model, tokenizer, examples: list[ChoiceExample]) -> torch.Tensor:
    """Mean cross-entropy of the answer labels (label tokens + end of turn) given their listing prompts."""
    sequences = [listing_example(tokenizer, e.messages, e.options, e.answer) for e in examples]
    length = max(ids.shape[0] for ids, _ in sequences)
    batch = torch.zeros(len(sequences), length, dtype=torch.long)  # (B, T) right-padded
    for row, (ids, _) in enumerate(sequences):
        batch[row, : ids.shape[0]] = ids
    logprobs = model(batch, use_cache=False).logits.float().log_softmax(-1)  # (B, T, V)
    losses = []
    for row, (ids, start) in enumerate(sequences):
        targets = ids[start:]  # (L,)
        losses.append(-logprobs[row, start - 1 : ids.shape[0] - 1].gather(1, targets[:, None]).sum())
    return torch.stack(losses).mean()


def choice_accuracy(model, tokenizer, adapter, examples: list[ChoiceExample], batch: int = 8) -> dict:
    """Share of ``examples`` whose best-scored option (summed label log-prob) is the answer, as the chat scores
    (every option scored in its own sequence), split into tool and reply items."""
    right = {"tool": [0, 0], "reply": [0, 0]}
    with torch.no_grad(), adapter.active(model):
        for example in examples:
            sequences = [listing_example(tokenizer, example.messages, example.options, o) for o in example.options]
            scores = []
            for i in range(0, len(sequences), batch):
                part = sequences[i : i + batch]
                length = max(ids.shape[0] for ids, _ in part)
                ids_batch = torch.zeros(len(part), length, dtype=torch.long)  # (b, T)
                for row, (ids, _) in enumerate(part):
                    ids_batch[row, : ids.shape[0]] = ids
                logprobs = model(ids_batch, use_cache=False).logits.float().log_softmax(-1)  # (b, T, V)
                for row, (ids, start) in enumerate(part):
                    target = ids[start:]
                    scores.append(float(logprobs[row, start - 1 : ids.shape[0] - 1].gather(1, target[:, None]).sum()))
            best = example.options[max(range(len(scores)), key=scores.__getitem__)]
            kind = "reply" if example.answer is None else "tool"
            right[kind][0] += best is example.answer
            right[kind][1] += 1
    return {kind: (a, n) for kind, (a, n) in right.items()}


def train_choice_adapter(model, tokenizer, cfg: ChoiceTrainConfig, data: dict | None = None, log=print):
    """Train a :class:`ChoiceAdapter` on ``model`` (frozen) and return ``(adapter, history)``; history holds
    the loss per step and the dev accuracy every ``cfg.dev_every`` steps (and at the end)."""
    data = data or load_tool_sets()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train_domains, dev_names = split_domains(data, cfg.dev_domains, cfg.seed)
    dev = dev_examples(data, dev_names)
    dev = random.Random(cfg.seed + 1).sample(dev, min(cfg.dev_limit, len(dev)))
    model.requires_grad_(False)
    adapter = ChoiceAdapter(model, cfg.rank, cfg.alpha, cfg.targets)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / max(cfg.steps, 1))
    )
    history = {"loss": [], "dev": [], "train_domains": train_domains, "dev_domains": dev_names}
    if dev:
        accuracy = choice_accuracy(model, tokenizer, adapter, dev)  # B = 0: the backbone alone
        history["dev"].append({"step": 0, **{k: list(v) for k, v in accuracy.items()}})
        log(f"step 0 dev accuracy {accuracy}")
    started = time.perf_counter()
    for step in range(cfg.steps):
        batch = [make_example(data, train_domains, rng, cfg) for _ in range(cfg.batch_size)]
        with adapter.active(model):
            loss = label_loss(model, tokenizer, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history["loss"].append(round(loss.item(), 4))
        if step % 10 == 0:
            log(f"step {step} loss {float(loss):.3f} ({time.perf_counter() - started:.0f}s)")
        if dev and ((step + 1) % cfg.dev_every == 0 or step + 1 == cfg.steps):
            accuracy = choice_accuracy(model, tokenizer, adapter, dev)
            history["dev"].append({"step": step + 1, **{k: list(v) for k, v in accuracy.items()}})
            log(f"step {step + 1} dev accuracy {accuracy}")
    history["seconds"] = round(time.perf_counter() - started, 1)
    return adapter, history
