"""Rung 1's fixed closed-fact test set: pinned content, held-out wording, facts outside the read window."""

import pytest

from deltamem_agents.eval.methods import METHODS, build_prompt
from deltamem_agents.eval.tasks import closed_task
from deltamem_agents.train import closed_facts
from deltamem_agents.train.closed_facts import (
    KINDS,
    TEST_SHA256,
    TEST_TEMPLATES,
    TRAIN_TEMPLATES,
    VALUES,
    ClosedFactEpisodes,
    closed_facts_test,
    content_sha256,
)
from deltamem_agents.train.filler import FillerSource


def test_test_set_is_pinned_and_split_in_two_halves():
    everything = closed_facts_test("all")
    if everything[0].meta["filler"] != "chitchat-dataset":
        pytest.skip("the pinned set uses chitchat-dataset small talk, not installed here")
    assert content_sha256(everything) == TEST_SHA256  # a change of the generator must be deliberate
    tune, report = closed_facts_test("tune"), closed_facts_test("report")
    assert [e.id for e in tune + report] == [e.id for e in everything]
    assert not {e.id for e in tune} & {e.id for e in report}
    assert sum(len(e.questions) for e in tune) >= 200 and sum(len(e.questions) for e in report) >= 200
    with pytest.raises(ValueError, match="half"):
        closed_facts_test("train")


def test_test_wording_and_small_talk_never_appear_in_training():
    train_text = {t.statement for t in TRAIN_TEMPLATES} | {t.question for t in TRAIN_TEMPLATES}
    test_text = {t.statement for t in TEST_TEMPLATES} | {t.question for t in TEST_TEMPLATES}
    assert not train_text & test_text
    assert {t.kind for t in TEST_TEMPLATES} == set(KINDS) == {t.kind for t in TRAIN_TEMPLATES}
    train_filler = set(FillerSource("train").pairs)
    for episode in closed_facts_test("all"):
        asked = {q.question for q in episode.questions}
        assert asked <= {t.question for t in TEST_TEMPLATES}
        after = [m["content"] for m in episode.history()[2 * len(KINDS) :]]
        assert not any(pair in train_filler for pair in zip(after[::2], after[1::2]))  # no train small talk
    training = ClosedFactEpisodes("train").train_episodes(50, level=2)
    assert all(q.question in {t.question for t in TRAIN_TEMPLATES} for e in training for q in e.questions)


def test_facts_open_session_one_then_five_plus_messages_of_small_talk_outside_the_window():
    for episode in closed_facts_test("tune"):
        history = episode.history()
        assert len(episode.sessions) >= 2 and len(episode.questions) == len(KINDS)
        for q in episode.questions:
            session, message = q.evidence[0]
            assert session == 0 and message < 2 * len(KINDS)
            stated = episode.sessions[session].messages[message]["content"]
            assert q.answer in stated
            if q.kind != "number":
                assert q.answer in VALUES[q.kind]
            else:
                assert 100 <= int(q.answer) <= 999
        after = len(history) - 2 * len(KINDS)
        assert after >= 6
    conversation = closed_task("tune")[0]
    for q in conversation.questions:  # the read prompt of the window / δ-mem methods never holds the fact
        for name in ("window", "delta", "delta_control"):
            prompt = build_prompt(METHODS[name], conversation, q.question, "sys", lambda t: len(t.split()), window=2)
            assert not any(q.answer in m["content"] for m in prompt)


def test_training_levels():
    gen = ClosedFactEpisodes("train")
    level0 = gen.train_episodes(20, level=0)
    assert all(e.questions[0].answer in e.history()[-2]["content"] for e in level0)
    assert gen.train_episodes(5, 1, seed=3) == gen.train_episodes(5, 1, seed=3)
    with pytest.raises(ValueError, match="level"):
        gen.train_episodes(1, level=9)
    with pytest.raises(ValueError, match="split"):
        closed_facts.ClosedFactEpisodes("dev")


def test_varied_training_phrasings_share_nothing_distinctive_with_the_test_wording():
    varied = closed_facts.VARIED_TRAIN_TEMPLATES
    assert len({(t.statement, t.question) for t in varied}) == len(varied) >= 400
    assert {t.kind for t in varied} == set(KINDS)
    test_phrases = (
        "backpack", "kitchen", "scarf", "grandmother", "piano", "farmers", "dentist", "gym", "parcel", "concert",
        "neighbour", "kids", "company", "just so you know", "remind me", "from now on", "write down", "only runs",
        "booked", "finally", "given",
    )  # fmt: skip
    for template in varied:
        text = f"{template.statement} {template.question}".lower()
        assert "{v}" in template.statement and "{" not in template.question
        assert not [p for p in test_phrases if p in text], template
    episodes = ClosedFactEpisodes("train", templates="varied").train_episodes(40, 2, seed=3)
    used = {m["content"] for e in episodes for m in e.history()}
    assert len(used & {t.statement.format(v=v) for t in varied for v in ("red", "Monday", "dog")}) > 5
    with pytest.raises(ValueError, match="train split only"):
        ClosedFactEpisodes("test", templates="varied")
