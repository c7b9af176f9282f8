"""The tool-choice adapter (LoRA deltas active only while scoring) and its training, on the tiny random backbone."""

import copy
import random

import pytest
import torch
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.core.errors import AdapterError
from deltamem_agents.serving.choice_adapter import ChoiceAdapter
from deltamem_agents.serving.tool_choice import (
    channel_scores,
    choose_action,
    listed_scores,
    listing_example,
    sequence_logprobs,
)
from deltamem_agents.serving.tool_grammar import ToolSpec, tool_specs
from deltamem_agents.train.choice_training import (
    ChoiceTrainConfig,
    choice_accuracy,
    label_loss,
    make_example,
    train_choice_adapter,
)

SPECS = tool_specs(
    [
        {"name": "open_case", "description": "open a case", "parameters": {"properties": {"title": {}}}},
        {"name": "case_info", "description": "show a case", "parameters": {"properties": {"case_id": {}}}},
    ]
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "show case 4"}]


@pytest.fixture()
def engine():
    return tiny_engine()


def random_adapter(model, seed=0) -> ChoiceAdapter:
    adapter = ChoiceAdapter(model, rank=4, alpha=8.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in (adapter.down, adapter.up):
            for key in table.keys():
                table[key].copy_(torch.randn(table[key].shape, generator=generator) * 0.2)
    return adapter


def logits(model, ids):
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits[0]


def test_hooks_equal_the_merged_weights_reference(engine):
    model = engine.model
    adapter = random_adapter(model)
    ids = engine.render_prompt(MESSAGES)
    with adapter.active(model):
        hooked = logits(model, ids)
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name in adapter.names:
            modules[name].weight.copy_(adapter.merged_weight(model, name))
    assert torch.allclose(hooked, logits(merged, ids), atol=1e-4)
    assert not torch.allclose(hooked, logits(model, ids), atol=1e-3)  # the adapter does change the scores


def test_a_fresh_adapter_is_the_identity_and_hooks_go_on_exit(engine):
    model = engine.model
    ids = engine.render_prompt(MESSAGES)
    base = logits(model, ids)
    with ChoiceAdapter(model).active(model):
        assert torch.allclose(logits(model, ids), base, atol=1e-6)  # B starts at zero
    adapter = random_adapter(model)
    with pytest.raises(RuntimeError), adapter.active(model):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), base)  # removed, also after the exception


def test_save_and_load_round_trip_and_refuse_what_does_not_fit(engine, tmp_path):
    model = engine.model
    adapter = random_adapter(model)
    adapter.save(tmp_path / "a")
    loaded = ChoiceAdapter.load(tmp_path / "a", model)
    assert loaded.fingerprint() == adapter.fingerprint() != ChoiceAdapter(model).fingerprint()
    ids = engine.render_prompt(MESSAGES)
    with adapter.active(model):
        first = logits(model, ids)
    with loaded.active(model):
        assert torch.equal(logits(model, ids), first)
    with pytest.raises(AdapterError, match="needs choice_adapter.safetensors"):
        ChoiceAdapter.load(tmp_path / "missing", model)
    ChoiceAdapter(model, targets=("q_proj",)).save(tmp_path / "q_only")
    (tmp_path / "q_only" / "choice_adapter.json").write_text((tmp_path / "a" / "choice_adapter.json").read_text())
    with pytest.raises(AdapterError, match="do not match"):
        ChoiceAdapter.load(tmp_path / "q_only", model)


def test_listed_scores_match_one_sequence_at_a_time_on_the_merged_model(engine):
    """The batched, hooked scores against the naive reference: each option's sequence alone, weights merged."""
    adapter = random_adapter(engine.model)
    scores = listed_scores(engine, None, MESSAGES, SPECS, True, adapter)
    merged_engine = copy.copy(engine)
    merged_engine.model = copy.deepcopy(engine.model)
    modules = dict(merged_engine.model.named_modules())
    with torch.no_grad():
        for name in adapter.names:
            modules[name].weight.copy_(adapter.merged_weight(engine.model, name))
    options = [*SPECS, None]
    for option in options:
        ids, start = listing_example(engine.tokenizer, MESSAGES, options, option)
        expected = sum(sequence_logprobs(merged_engine, None, ids, start))
        assert scores[option.name if option else "reply"] == pytest.approx(expected, abs=1e-3)


def test_choose_action_adds_the_weighted_channel_score(engine):
    adapter = random_adapter(engine.model)
    listed = listed_scores(engine, None, MESSAGES, SPECS, True, adapter)
    channel = channel_scores(engine, None, MESSAGES, SPECS, True)
    choice = choose_action(engine, None, MESSAGES, SPECS, True, adapter=adapter, channel_weight=0.5, reply_bias=2.0)
    assert choice.method == "channel+listed"
    for action in listed:
        expected = listed[action] + 0.5 * channel[action] + (2.0 if action == "reply" else 0.0)
        assert choice.scores[action] == pytest.approx(expected, abs=1e-3)
    alone = choose_action(engine, None, MESSAGES, SPECS, False, adapter=adapter, channel_weight=0.0)
    assert alone.method == "listed" and set(alone.scores) == {"open_case", "case_info"}


def toy_data() -> dict:
    tools = [
        ToolSpec(n, d, {"properties": {}})
        for n, d in [("alpha", "the first"), ("beta", "the second"), ("gamma", "the third")]
    ]
    domain = {
        "system": "hi",
        "tools": tools,
        "off_topic": ["la la"],
        "requests": {"alpha": ["aaa", "a a"], "beta": ["bbb", "b b"], "gamma": ["ccc", "c c"]},
    }
    return {"domains": {"one": domain, "two": {**domain, "system": "yo"}}, "replies": ["thanks"]}


def test_examples_list_the_answer_and_the_reply_when_it_is_the_answer():
    data, cfg = toy_data(), ChoiceTrainConfig()
    rng = random.Random(0)
    for _ in range(50):
        example = make_example(data, ["one", "two"], rng, cfg)
        assert example.answer in example.options
        names = [o.name if o else "reply" for o in example.options]
        assert len(names) == len(set(names))


def test_training_lowers_the_label_loss_and_the_chat_uses_the_adapter(engine, tmp_path):
    data = toy_data()
    model, tokenizer = engine.model, engine.tokenizer
    cfg = ChoiceTrainConfig(steps=60, batch_size=6, lr=3e-2, rank=4, dev_domains=0, reply_share=0.2)
    fixed = [make_example(data, ["one", "two"], random.Random(5), cfg) for _ in range(12)]
    base = ChoiceAdapter(model, rank=4)
    with torch.no_grad(), base.active(model):
        before = float(label_loss(model, tokenizer, fixed))
    adapter, history = train_choice_adapter(model, tokenizer, cfg, data, log=lambda *_: None)
    with torch.no_grad(), adapter.active(model):
        after = float(label_loss(model, tokenizer, fixed))
    # the random tiny model's logits are nearly flat (lm_head weights ~0.02), so only a few nats can go
    assert after < before - 1.5 and len(history["loss"]) == 60
    right = choice_accuracy(model, tokenizer, adapter, fixed)
    assert right["tool"][1] + right["reply"][1] == len(fixed)
    adapter.save(tmp_path / "choice")
    chat = DeltaMemChat(engine=engine, tool_scoring="likelihood", choice_adapter=str(tmp_path / "choice"))
    assert chat.choice_adapter_fingerprint() == adapter.fingerprint()
    assert chat._identifying_params["choice_adapter_fingerprint"] == adapter.fingerprint()
