"""Evaluation: LoCoMo scoring rules, task loading, the method runner with its resumable cache, and reports."""

import json

import pytest
import torch
from tiny_chat import char_tokenizer
from tiny_models import randomize_memory, tiny_model

from deltamem_agents import DeltaMemConfig, attach_memory
from deltamem_agents.eval import runner
from deltamem_agents.eval.methods import METHODS, build_prompt
from deltamem_agents.eval.report import bootstrap_ci, markdown, summarize, write_report
from deltamem_agents.eval.scoring import contains_answer, exact_match, locomo_f1, normalize_answer, token_f1
from deltamem_agents.eval.tasks import TEMPORAL_SUFFIX, EvalConversation, EvalQuestion, locomo_task


def test_normalisation_and_f1():
    assert normalize_answer("The Cat, and a Dog!") == "cat dog"
    assert token_f1("running dogs", "the dog runs") == 1.0  # Porter stems: run, dog
    assert token_f1("blue", "red") == 0.0
    assert exact_match("Teal.\nmore text", "teal") == 1.0
    assert contains_answer("I think it is teal.", "Teal") == 1.0 and contains_answer("tealish", "teal") == 0.0


def test_locomo_category_rules():
    assert locomo_f1("psychology", "Psychology, counseling certification", 1) == pytest.approx(0.5)
    assert locomo_f1("painting", "painting; she also likes music", 3) == 1.0
    assert locomo_f1("\n\n7 May 2023\nsecond line", "7 May 2023", 2) == 1.0


def test_locomo_loader(tmp_path):
    sample = {
        "sample_id": "c1",
        "conversation": {
            "speaker_a": "A",
            "speaker_b": "B",
            "session_2_date_time": "2 June",
            "session_2": [{"speaker": "B", "dia_id": "D2:1", "text": "bye"}],
            "session_1_date_time": "1 May",
            "session_1": [{"speaker": "A", "dia_id": "D1:1", "text": "hi", "blip_caption": "a cat"}],
        },
        "qa": [
            {"question": "When?", "answer": "1 May", "category": 2},
            {"question": "Trick?", "adversarial_answer": "x", "category": 5},
        ],
    }
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps([sample]))
    (conversation,) = locomo_task(str(path))
    assert conversation.messages[0]["content"] == 'DATE: 1 May\nA said, "hi [shares a cat]"'
    assert conversation.messages[1]["content"].startswith("DATE: 2 June")
    assert [q.category for q in conversation.questions] == [2]
    assert conversation.questions[0].question == "When?" + TEMPORAL_SUFFIX
    with pytest.raises(Exception, match="no LoCoMo file"):
        locomo_task(str(tmp_path / "missing.json"))


def conversations() -> list[EvalConversation]:
    out = []
    for i, letter in enumerate("abc"):
        messages = ({"role": "user", "content": f"k={letter}"}, {"role": "assistant", "content": "ok"})
        out.append(
            EvalConversation(
                id=f"c{i}",
                messages=messages + ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}),
                notes=tuple((m["role"], m["content"]) for m in messages) + (("user", "hi"), ("assistant", "yo")),
                questions=(EvalQuestion("k?", letter), EvalQuestion("k=?", letter)),
            )
        )
    return out


def test_prompts_of_the_methods():
    conv = conversations()[0]
    count = len
    window = build_prompt(METHODS["window"], conv, "k?", "m", count, window=2)
    assert [m["content"] for m in window] == ["m", "hi", "yo", "k?"]
    notes = build_prompt(METHODS["bm25"], conv, "k?", "m", count, window=2)
    assert "k=a" in notes[0]["content"] and len(notes) == 4
    full = build_prompt(METHODS["full"], conv, "k?", "m", count, max_prompt_tokens=1000)
    assert [m["content"] for m in full[1:-1]] == ["k=a", "ok", "hi", "yo"]


def test_runner_uses_own_and_other_memory_and_resumes_from_cache(tmp_path, monkeypatch):
    tokenizer = char_tokenizer()
    model = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    attach_memory(model, DeltaMemConfig())
    randomize_memory(model)
    convs = conversations()
    seen = []
    original = runner.answer

    def spy(engine, messages, state, settings):
        seen.append(state)
        return original(engine, messages, state, settings)

    monkeypatch.setattr(runner, "answer", spy)
    methods = ["window", "delta", "delta_control"]
    records = runner.evaluate(model, tokenizer, "toy", convs, methods, tmp_path, max_new_tokens=2, system_prompt="m")
    assert len(records) == 3 * 3 * 2 and len(seen) == 18
    window_states = seen[0:2]
    own, other = seen[2], seen[4]
    assert window_states == [None, None]
    assert not own.equal(other) and not own.is_zero()
    assert other.equal(runner.write_state(model, tokenizer, convs[1]))
    seen.clear()
    again = runner.evaluate(model, tokenizer, "toy", convs, methods, tmp_path, max_new_tokens=2, system_prompt="m")
    assert seen == [] and again == records  # everything came from the per-conversation cache
    longer = runner.evaluate(model, tokenizer, "toy", convs, methods, tmp_path, max_new_tokens=3, system_prompt="m")
    assert len(seen) == 18 and {r["max_new_tokens"] for r in longer} == {3}  # other decoding: answered anew


def test_report_tables_and_paired_differences(tmp_path):
    records = []
    for method, hits in (("window", [0, 0, 1, 0]), ("delta", [1, 1, 1, 0]), ("delta_control", [0, 0, 1, 0])):
        for i, hit in enumerate(hits):
            records.append(
                {
                    "task": "t",
                    "method": method,
                    "conversation": "c",
                    "question_index": i,
                    "f1": hit,
                    "em": hit,
                    "contains": hit,
                    "prompt_tokens": 10,
                    "latency_s": 0.1,
                }
            )
    summary = summarize(records)
    diff = summary["t"]["paired_differences"]["delta - window (contains)"]
    assert diff["mean"] == pytest.approx(0.5) and diff["ci"][0] <= 0.5 <= diff["ci"][1]
    assert "| delta | 4 |" in markdown(summary)
    write_report(records, tmp_path, "x")
    assert (tmp_path / "x.png").stat().st_size > 1000 and json.loads((tmp_path / "x.json").read_text())["records"]
    low, high = bootstrap_ci([1.0] * 10)
    assert low == high == 1.0


def test_locomo_text_is_not_written_to_reports(tmp_path):
    record = {
        "task": "locomo",
        "method": "window",
        "conversation": "c",
        "question_index": 0,
        "question": "q?",
        "answer": "a",
        "prediction": "p",
        "category": 1,
        "f1": 0.0,
        "em": 0.0,
        "contains": 0.0,
        "prompt_tokens": 5,
        "latency_s": 0.1,
    }
    write_report([record], tmp_path, "l")
    text = (tmp_path / "l.json").read_text()
    assert '"question"' not in text and '"answer"' not in text and '"prediction"' not in text


def test_plain_methods_leave_a_model_without_memory_as_it_was(tmp_path):
    from deltamem_agents import has_memory

    model = tiny_model("llama", seed=0)
    records = runner.evaluate(model, char_tokenizer(), "toy", conversations(), ["window"], tmp_path, max_new_tokens=2)
    assert len(records) == 3 * 2 and all(r["decoding"] == "greedy" for r in records)
    assert not has_memory(model)  # the evaluation's own identity memory is detached again
