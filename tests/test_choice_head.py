"""The tool-choice head (a linear read-out of the channel forward's hidden states) and its training, on the tiny
random backbone."""

import pytest
import torch
from langchain_core.messages import HumanMessage
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.core.cache import DeltaMemCache
from deltamem_agents.core.errors import AdapterError, ConfigError
from deltamem_agents.serving.choice_head import ChoiceHead
from deltamem_agents.serving.tool_choice import (
    channel_and_head_scores,
    channel_features,
    channel_scores,
    channel_sequences,
    choose_action,
    sequence_logprobs,
)
from deltamem_agents.serving.tool_grammar import ToolSpec, tool_specs
from deltamem_agents.train.choice_training import (
    ItemFeatures,
    accuracy,
    choose_l2,
    extract,
    fit_head,
    items_of,
    load_features,
    save_features,
)

SPECS = tool_specs(
    [
        {"name": "open_case", "description": "open a case", "parameters": {"properties": {"title": {}}}},
        {"name": "case_info", "description": "show a case", "parameters": {"properties": {"case_id": {}}}},
    ]
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "show case 4"}]
LAYERS = (1, 2)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def random_head(hidden: int, seed: int = 0, reply_bias: float = 0.5) -> ChoiceHead:
    generator = torch.Generator().manual_seed(seed)
    size = len(LAYERS) * hidden
    weight = torch.randn(size, generator=generator)
    mean, std = torch.randn(size, generator=generator) * 0.1, torch.rand(size, generator=generator) + 0.5
    return ChoiceHead(LAYERS, weight, mean, std, torch.tensor([reply_bias]), channel_weight=0.7)


def test_features_and_channel_scores_match_one_sequence_at_a_time(engine):
    """The batched forward's channel scores and last-token states against each sequence run alone."""
    options = [*SPECS, None]
    channel, features = channel_features(engine, None, MESSAGES, options, LAYERS)
    assert channel == pytest.approx(list(channel_scores(engine, None, MESSAGES, SPECS, True).values()), abs=1e-4)
    for row, (ids, start) in enumerate(channel_sequences(engine.tokenizer, MESSAGES, options)):
        assert channel[row] == pytest.approx(sum(sequence_logprobs(engine, None, ids, start)), abs=1e-3)
        with torch.no_grad():
            cache = DeltaMemCache(engine.model, engine.empty_state(), writes=False)  # as scoring: memory read only
            hidden = engine.model(ids[None], cache=cache, output_hidden_states=True).hidden_states
        alone = torch.cat([hidden[i][0, -1] for i in LAYERS])  # (F,)
        assert torch.allclose(features[row], alone, atol=1e-4)


def test_choose_action_adds_the_head_to_the_weighted_channel_score(engine):
    head = random_head(engine.model.config.hidden_size)
    channel, learned = channel_and_head_scores(engine, None, MESSAGES, SPECS, True, head)
    _, features = channel_features(engine, None, MESSAGES, [*SPECS, None], LAYERS)
    naive = ((features - head.mean) / head.std) @ head.weight  # (A,) by hand
    assert list(learned.values()) == pytest.approx((naive + torch.tensor([0, 0, 0.5])).tolist(), abs=1e-3)
    choice = choose_action(engine, None, MESSAGES, SPECS, True, reply_bias=2.0, head=head)
    assert choice.method == "channel+head"
    for action in channel:
        expected = 0.7 * channel[action] + learned[action] + (2.0 if action == "reply" else 0.0)
        assert choice.scores[action] == pytest.approx(expected, abs=1e-3)
    zero = ChoiceHead.zeros(LAYERS, engine.model.config.hidden_size)
    plain = choose_action(engine, None, MESSAGES, SPECS, True)
    assert choose_action(engine, None, MESSAGES, SPECS, True, head=zero).scores == pytest.approx(plain.scores)


def test_save_load_round_trip_and_clear_errors(engine, tmp_path):
    hidden = engine.model.config.hidden_size
    head = random_head(hidden)
    head.save(tmp_path / "h")
    loaded = ChoiceHead.load(tmp_path / "h", hidden, engine.model.config.num_hidden_layers + 1)
    assert loaded.fingerprint() == head.fingerprint() != random_head(hidden, seed=1).fingerprint()
    assert loaded.channel_weight == pytest.approx(0.7)
    with pytest.raises(AdapterError, match="needs choice_head.safetensors"):
        ChoiceHead.load(tmp_path / "nothing")
    with pytest.raises(AdapterError, match="trained for another backbone"):
        ChoiceHead.load(tmp_path / "h", hidden_size=hidden * 2)
    with pytest.raises(AdapterError, match="reads layer 2"):
        ChoiceHead.load(tmp_path / "h", hidden, num_states=2)


def test_the_chat_scores_with_its_head(engine, tmp_path):
    hidden = engine.model.config.hidden_size
    replying = ChoiceHead(
        LAYERS, torch.zeros(2 * hidden), torch.zeros(2 * hidden), torch.ones(2 * hidden), torch.tensor([1e4])
    )  # the reply always wins under auto
    replying.save(tmp_path / "reply")
    chat = DeltaMemChat(engine=engine, tool_scoring="likelihood", max_new_tokens=8, choice_head=str(tmp_path / "reply"))
    message = chat.bind_tools(SPECS_AS_TOOLS, tool_choice="auto").invoke([HumanMessage("show case 4")])
    assert message.response_metadata["tool_choice"] == {"action": "reply", "method": "channel+head"}
    assert not message.tool_calls
    assert chat._identifying_params["choice_head_fingerprint"] == replying.fingerprint()
    assert DeltaMemChat(engine=engine)._identifying_params["choice_head_fingerprint"] is None
    with pytest.raises(ConfigError, match="needs tool_scoring='likelihood'"):
        DeltaMemChat(engine=engine, choice_head=str(tmp_path / "reply"))  # the grammar choice would ignore it
    with pytest.raises(AdapterError, match="is not a tool-choice head"):
        DeltaMemChat(engine=engine, tool_scoring="likelihood", choice_head=str(tmp_path / "nothing"))


SPECS_AS_TOOLS = [
    {
        "type": "function",
        "function": {"name": s.name, "description": s.description, "parameters": {"type": "object", "properties": {}}},
    }
    for s in SPECS
]


def toy_data() -> dict:
    def tool(name):
        return ToolSpec(name, f"the {name} tool", {"properties": {}})

    domain = {
        "system": "hi",
        "tools": [tool("alpha"), tool("beta")],
        "off_topic": ["la la"],
        "requests": {"alpha": ["aaa", "a a"], "beta": ["bbb"]},
    }
    return {"domains": {"one": domain, "two": {**domain, "system": "yo"}}, "replies": ["thanks", "bye", "ok"]}


def test_items_cover_every_message_with_its_answer():
    items = items_of(toy_data())
    one = [(i.messages[1]["content"], i.answer) for i in items if i.domain == "one"]
    # requests by tool, then off-topic, then the general replies assigned round-robin (one: 0 and 2, two: 1)
    assert one == [("aaa", 0), ("a a", 0), ("bbb", 1), ("la la", 2), ("thanks", 2), ("ok", 2)]
    assert all(i.options[-1] is None and len(i.options) == 3 for i in items)


def test_extract_save_load_round_trip(engine, tmp_path):
    items = items_of(toy_data(), ["two"])
    feats = extract(engine, items, LAYERS, log=lambda *_: None)
    save_features(feats, tmp_path / "f.safetensors")
    back = load_features(tmp_path / "f.safetensors")
    assert back.domains == ["two"] * len(items) and back.answers == [i.answer for i in items]
    assert all(torch.equal(a, b) for a, b in zip(back.features, feats.features))
    assert all(torch.equal(a, b) for a, b in zip(back.channel, feats.channel))
    assert all(torch.equal(a, b) for a, b in zip(back.is_reply, feats.is_reply))
    with pytest.raises(ValueError, match="unknown domains"):
        items_of(toy_data(), ["three"])


def separable(n_per_domain: int = 30, seed: int = 0) -> ItemFeatures:
    """Synthetic items whose right option has a larger first feature (plus noise); channel scores are noise."""
    generator = torch.Generator().manual_seed(seed)
    out = ItemFeatures([], [], [], [], [])
    for domain in ("a", "b", "c"):
        for k in range(n_per_domain):
            answer = k % 3
            features = torch.randn(3, 4, generator=generator)
            features[answer, 0] += 3.0
            out.domains.append(domain)
            out.features.append(features.half())
            out.channel.append(torch.randn(3, generator=generator))
            out.is_reply.append(torch.tensor([False, False, True]))
            out.answers.append(answer)
    return out


def test_fit_learns_a_separable_choice_and_cross_validates_by_domain():
    feats = separable()
    chance = accuracy(ChoiceHead.zeros((0, 1), 2), feats)
    head = fit_head(feats, (0, 1), l2=1e-3)
    right = accuracy(head, feats)
    assert right["auto_tools"][0] / right["auto_tools"][1] > 0.9 > chance["auto_tools"][0] / chance["auto_tools"][1]
    assert right["auto_replies"][0] / right["auto_replies"][1] > 0.9
    table = choose_l2(feats, (0, 1), grid=(1e-3, 10.0))
    assert set(table) == {1e-3, 10.0}
    assert table[1e-3]["any"][1] == sum(a != 2 for a in feats.answers)  # every tool item scored once
