"""Episode JSONL format, loader errors, synthetic splits without shared templates or entities, curriculum levels,
and the tokenization of an episode into write and read passes."""

import json

import pytest
import torch
from tiny_chat import char_tokenizer

from deltamem_agents.train.batching import IGNORE, collate, encode_example
from deltamem_agents.train.episodes import Episode, EpisodeFormatError, load_episodes, save_episodes
from deltamem_agents.train.synthetic import SyntheticEpisodes


def test_jsonl_round_trip(tmp_path):
    episodes = SyntheticEpisodes("train", seed=0, use_chitchat=False).episodes(5, level=3)
    path = save_episodes(episodes, tmp_path / "e.jsonl")
    assert load_episodes(path) == episodes


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not valid JSON"),
        (json.dumps({"id": "x", "sessions": []}), "missing field 'questions'"),
        (
            json.dumps({"id": "x", "sessions": [{"messages": [{"role": "bot", "content": "hi"}]}], "questions": []}),
            "role",
        ),
        (json.dumps({"id": "x", "sessions": [], "questions": []}), "at least one question"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n" + line + "\n")
    with pytest.raises(EpisodeFormatError, match=message) as err:
        load_episodes(path)
    assert "bad.jsonl:2" in str(err.value)


def test_splits_share_no_template_and_no_entity():
    train, test = SyntheticEpisodes("train", seed=3), SyntheticEpisodes("test", seed=3)
    assert not {a.key for a in train.attributes} & {a.key for a in test.attributes}
    assert not {a.question for a in train.attributes} & {a.question for a in test.attributes}
    for pool in train.values:
        assert not set(train.values[pool]) & set(test.values[pool]), pool
    train_answers = {q.answer for e in train.episodes(300, level=3) for q in e.questions}
    test_answers = {q.answer for e in test.episodes(300, level=3) for q in e.questions}
    assert not train_answers & test_answers
    assert SyntheticEpisodes("test", seed=3).episodes(3) == test.episodes(3)  # same seed, same episodes


def test_curriculum_levels_move_the_fact_back_and_add_facts():
    generator = SyntheticEpisodes("train", seed=0, use_chitchat=False)
    for episode in generator.episodes(20, level=0):
        history = episode.history()
        assert len(episode.questions) == 1 and len(history) == 2
        assert episode.questions[0].answer in history[0]["content"]
    distances = []
    for episode in generator.episodes(40, level=3):
        s, m = episode.questions[0].evidence[0]
        stated = episode.sessions[s].messages[m]["content"]
        assert episode.questions[0].answer in stated
        distances.append(sum(len(x.messages) for x in episode.sessions[s:]) - m)
    assert min(len(e.questions) for e in generator.episodes(40, level=3)) >= 2
    assert min(distances) > 2
    with pytest.raises(ValueError, match="curriculum level"):
        generator.episode(__import__("random").Random(0), level=7)


def test_encoding_puts_labels_on_the_answer_only():
    tokenizer = char_tokenizer()
    episode = Episode.from_json(
        {
            "id": "a",
            "sessions": [{"messages": [{"role": "user", "content": "k=b"}]}],
            "questions": [{"question": "k?", "answer": "b"}],
        }
    )
    example = encode_example(tokenizer, episode, system_prompt="m")
    answer = example.read_ids[example.labels != IGNORE]
    assert tokenizer.decode(answer.tolist()) == "b<|im_end|>"
    written = tokenizer.decode(torch.cat(example.write_pieces).tolist())
    assert "k=b" in written and "system" not in written  # the system prompt is never written
    assert "k=b" not in tokenizer.decode(example.read_ids.tolist())
    other = encode_example(tokenizer, episode, system_prompt="mmmm")
    assert [p.tolist() for p in other.write_pieces] == [p.tolist() for p in example.write_pieces]
    batch = collate([example, other])
    assert [c.mask.sum(1).tolist() for c in batch.write_calls] == [[example.write_tokens] * 2]
