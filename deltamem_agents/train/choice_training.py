"""Training of the tool-choice head (``serving.choice_head``) on generated requests over many tool sets.

The data (``deltamem_agents/train/data/tool_sets.json``) holds tool sets of domains that the request set of
``examples/ticketing_bot/requests.json`` does not have (no tickets, calendars, shops or smart homes): requests
per tool, off-topic messages per domain, and general messages that need a plain reply (each assigned to one
domain, round-robin). An item is one turn: the domain's system message and one message, with every tool of the
domain and the reply as options, exactly as the chat scores a turn.

1. :func:`extract`: for every item, each option's channel score and the hidden states of the chosen layers at
   its channel sequence's last token (``tool_choice.channel_features``; the slow part, one forward per item).
2. :func:`fit_head`: the head's weights, reply bias and channel weight by full-batch softmax cross-entropy per
   item, over all options ("auto") and over the tools alone for tool items ("any"), with an L2 penalty.
3. :func:`choose_l2`: the L2 weight by the accuracy on whole held-out domains (dev), then a refit on all.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from deltamem_agents.serving.choice_head import ChoiceHead
from deltamem_agents.serving.tool_choice import channel_features
from deltamem_agents.serving.tool_grammar import ToolSpec

TOOL_SETS = Path(__file__).with_name("data") / "tool_sets.json"
DEFAULT_LAYERS = (10, 20, 30)


@dataclass(frozen=True)
class ChoiceItem:
    """One turn: its domain, the chat dicts (system, user), the options (ToolSpecs, then None: the reply) and
    the index of the right one."""

    domain: str
    messages: list
    options: list
    answer: int


@dataclass
class ItemFeatures:
    """What :func:`extract` keeps of items: per item, features (A, F), channel scores (A,), which option is the
    reply (A,) and the answer index."""

    domains: list[str]
    features: list[torch.Tensor]
    channel: list[torch.Tensor]
    is_reply: list[torch.Tensor]
    answers: list[int]

    def layers(self, stored, chosen) -> "ItemFeatures":
        """The features of the ``chosen`` layers only, from features extracted for the ``stored`` layers."""
        width = self.features[0].shape[1] // len(stored)
        columns = torch.cat([torch.arange(width) + stored.index(layer) * width for layer in chosen])
        return ItemFeatures(
            self.domains, [f[:, columns] for f in self.features], self.channel, self.is_reply, self.answers
        )

    def subset(self, keep) -> "ItemFeatures":
        rows = [i for i, d in enumerate(self.domains) if keep(d)]
        columns = (self.domains, self.features, self.channel, self.is_reply, self.answers)
        return ItemFeatures(*([column[i] for i in rows] for column in columns))


def load_tool_sets(path=TOOL_SETS) -> dict:
    """``{"domains": {name: {"system", "tools": [ToolSpec], "requests": {tool: [text]}, "off_topic"}},
    "replies": [text]}``, every request's tool checked against its domain's tools."""
    data = json.loads(Path(path).read_text())
    domains = {}
    for name, spec in data["domains"].items():
        tools = [ToolSpec(t["name"], t.get("description", ""), t.get("parameters") or {}) for t in spec["tools"]]
        unknown = set(spec["requests"]) - {t.name for t in tools}
        if unknown:
            raise ValueError(f"{path}: domain {name!r} has requests for unknown tools {sorted(unknown)}")
        domains[name] = {**spec, "tools": tools}
    return {"domains": domains, "replies": list(data["replies"])}


def items_of(data: dict, domains=None, per_tool: int | None = None) -> list[ChoiceItem]:
    """Every request (or the first ``per_tool`` of each tool), off-topic message and assigned general reply of
    ``domains`` (default: all), in order."""
    names = sorted(data["domains"])
    unknown = set(domains or ()) - set(names)
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; the data has {names}")
    assigned = {n: [] for n in names}
    for i, text in enumerate(data["replies"]):
        assigned[names[i % len(names)]].append(text)
    out = []
    for name in names if domains is None else [n for n in names if n in set(domains)]:
        domain = data["domains"][name]
        options = [*domain["tools"], None]
        system = {"role": "system", "content": domain["system"]}
        for index, tool in enumerate(domain["tools"]):
            for text in domain["requests"].get(tool.name, [])[:per_tool]:
                out.append(ChoiceItem(name, [system, {"role": "user", "content": text}], options, index))
        for text in [*domain.get("off_topic", []), *assigned[name]]:
            out.append(ChoiceItem(name, [system, {"role": "user", "content": text}], options, len(options) - 1))
    return out


def extract(engine, items: list[ChoiceItem], layers=DEFAULT_LAYERS, log=print) -> ItemFeatures:
    """Channel scores and hidden-state features of every option of every item (memory empty, as a new thread)."""
    out = ItemFeatures([], [], [], [], [])
    for n, item in enumerate(items):
        channel, features = channel_features(engine, None, item.messages, item.options, layers)
        out.domains.append(item.domain)
        out.features.append(features.half())
        out.channel.append(torch.tensor(channel))
        out.is_reply.append(torch.tensor([o is None for o in item.options]))
        out.answers.append(item.answer)
        if n % 50 == 0:
            log(f"extracted {n}/{len(items)}")
    return out


def save_features(feats: ItemFeatures, path) -> None:
    """One safetensors file: each item's features, channel scores and reply flags, with the domains and answers
    in its metadata (JSON)."""
    from safetensors.torch import save_file

    tensors = {}
    for i in range(len(feats.answers)):
        tensors[f"{i}.features"] = feats.features[i].contiguous()
        tensors[f"{i}.channel"] = feats.channel[i].contiguous()
        tensors[f"{i}.is_reply"] = feats.is_reply[i].to(torch.uint8).contiguous()
    save_file(tensors, str(path), metadata={"domains": json.dumps(feats.domains), "answers": json.dumps(feats.answers)})


def load_features(path) -> ItemFeatures:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        domains, answers = json.loads(meta["domains"]), json.loads(meta["answers"])
        get = f.get_tensor
        n = len(answers)
        return ItemFeatures(
            domains,
            [get(f"{i}.features") for i in range(n)],
            [get(f"{i}.channel") for i in range(n)],
            [get(f"{i}.is_reply").bool() for i in range(n)],
            answers,
        )


def _padded(feats: ItemFeatures):
    """(N, A, F) features, (N, A) channel, (N, A) is_reply, (N, A) valid, (N,) answers (options padded)."""
    n, a = len(feats.answers), max(x.shape[0] for x in feats.channel)
    size = feats.features[0].shape[1]
    features = torch.zeros(n, a, size)  # (N, A, F)
    channel = torch.zeros(n, a)  # (N, A)
    is_reply = torch.zeros(n, a, dtype=torch.bool)
    valid = torch.zeros(n, a, dtype=torch.bool)
    for i in range(n):
        k = feats.channel[i].shape[0]
        features[i, :k], channel[i, :k] = feats.features[i].float(), feats.channel[i]
        is_reply[i, :k], valid[i, :k] = feats.is_reply[i], True
    return features, channel, is_reply, valid, torch.tensor(feats.answers)


def head_logits(head: ChoiceHead, features, channel, is_reply) -> torch.Tensor:
    """(N, A) scores the chat would use: channel_weight * channel + head."""
    n, a, size = features.shape
    learned = head.score(features.reshape(n * a, size), is_reply.reshape(-1)).reshape(n, a)
    return head.channel_weight * channel + learned


def fit_head(feats: ItemFeatures, layers, l2: float, steps: int = 300, lr: float = 0.05) -> ChoiceHead:
    """Fit weight, reply bias and channel weight (see the module docstring); mean and std from ``feats``."""
    features, channel, is_reply, valid, answers = _padded(feats)
    flat = features[valid]  # (M, F)
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-4)
    weight = torch.zeros(features.shape[-1], requires_grad=True)
    reply_bias = torch.zeros(1, requires_grad=True)
    log_channel = torch.zeros(1, requires_grad=True)  # channel weight = exp(.), starts at 1
    optimizer = torch.optim.Adam([weight, reply_bias, log_channel], lr=lr)
    tool_item = ~is_reply[torch.arange(len(answers)), answers]  # (N,)
    for _ in range(steps):
        head = ChoiceHead(tuple(layers), weight, mean, std, reply_bias, channel_weight=log_channel.exp())
        logits = head_logits(head, features, channel, is_reply)
        auto = logits.masked_fill(~valid, -1e9)
        tools_only = auto.masked_fill(is_reply, -1e9)[tool_item]
        loss = torch.nn.functional.cross_entropy(auto, answers)
        loss = loss + torch.nn.functional.cross_entropy(tools_only, answers[tool_item])
        loss = loss + l2 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    detached = [t.detach().clone() for t in (weight, mean, std, reply_bias)]
    return ChoiceHead(tuple(layers), *detached, channel_weight=float(log_channel.exp()))


def accuracy(head: ChoiceHead, feats: ItemFeatures, reply_bias: float = 0.0) -> dict:
    """Right choices under "any" (tool items, tools only) and "auto" (tool items; reply items), as counts.
    ``reply_bias`` is added to the reply's score as the chat's ``reply_bias`` is."""
    features, channel, is_reply, valid, answers = _padded(feats)
    with torch.no_grad():
        logits = head_logits(head, features, channel, is_reply) + reply_bias * is_reply
    auto = logits.masked_fill(~valid, -1e9).argmax(-1)
    tools = logits.masked_fill(~valid | is_reply, -1e9).argmax(-1)
    tool_item = ~is_reply[torch.arange(len(answers)), answers]
    return {
        "any": (int((tools == answers)[tool_item].sum()), int(tool_item.sum())),
        "auto_tools": (int((auto == answers)[tool_item].sum()), int(tool_item.sum())),
        "auto_replies": (int((auto == answers)[~tool_item].sum()), int((~tool_item).sum())),
    }


def choose_l2(feats: ItemFeatures, layers, grid=(1e-4, 1e-3, 1e-2, 1e-1), folds: int = 3, seed: int = 0) -> dict:
    """Dev accuracy of each L2 weight, domain-wise cross-validation (whole domains held out in turn)."""
    names = sorted(set(feats.domains))
    random.Random(seed).shuffle(names)
    results = {}
    for l2 in grid:
        total = {"any": [0, 0], "auto_tools": [0, 0], "auto_replies": [0, 0]}
        for fold in range(folds):
            dev = set(names[fold::folds])
            head = fit_head(feats.subset(lambda d, dev=dev: d not in dev), layers, l2)
            for key, (right, n) in accuracy(head, feats.subset(lambda d, dev=dev: d in dev)).items():
                total[key][0] += right
                total[key][1] += n
        results[l2] = {key: tuple(v) for key, v in total.items()}
    return results
