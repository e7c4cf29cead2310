"""Grade-level simplification with scripted LangChain chat models: the loop, facts, chunks, CLI, bad input."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import json
import re
import sys
import threading
import time
from typing import Any, Optional

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.pipelines import simplify as simplify_module
from langchain_adaptquant.pipelines.chunking import join_chunks, split_into_chunks
from langchain_adaptquant.pipelines.facts import check_facts, extract_facts
from langchain_adaptquant.pipelines.prompts import build_messages, clean_answer, grade_band, subject_hint
from langchain_adaptquant.pipelines.readability import longest_sentences, measure, split_sentences
from langchain_adaptquant.pipelines.simplify import (
    SimplificationResult,
    build_simplification_chain,
    model_accepts_task_priority,
    simplify_text,
)
from langchain_adaptquant.pipelines.simplify_cli import add_simplify_command

HARD = (
    "Photosynthesis is the biochemical process through which chlorophyll-containing organisms, including "
    "plants and algae, convert electromagnetic radiation into chemical energy, synthesizing carbohydrates and "
    "releasing approximately 300 billion tonnes of oxygen annually, according to estimates published by NASA."
)
EASY = (
    "Plants make food from light. This is called photosynthesis. Green chlorophyll helps them do it. "
    "Plants and algae give off about 300 billion tonnes of oxygen each year. NASA says so."
)
LONGEST_HARD_WORDS = "electromagnetic radiation"


def passage_of(messages: list[BaseMessage]) -> str:
    """The text between <passage> tags of the prompt (what the pipeline asked to rewrite)."""
    found = re.search(r"<passage>\n(.*?)\n</passage>", str(messages[1].content), re.S)
    assert found, "the prompt carries the passage between tags"
    return found.group(1)


class Scripted(BaseChatModel):
    """Answers from a script, in order, and records each call's kwargs. No ``task_priority`` field."""

    replies: list[str]
    level: Optional[str] = None
    calls: list[dict[str, Any]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        self.calls.append({"messages": messages, "kwargs": kwargs})
        reply = self.replies[min(len(self.calls) - 1, len(self.replies) - 1)]
        metadata = {"quantization_level": self.level} if self.level else {}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=reply, response_metadata=metadata))])


class PriorityScripted(Scripted):
    """Like ChatAdaptQuant, it declares a ``task_priority`` field, so the pipeline sends one per request."""

    task_priority: str = "balanced"


class PerChunk(BaseChatModel):
    """Answers each chunk with its first sentence; later chunks answer sooner, so completion order is reversed."""

    delay_s: float = 0.05
    started: list[int] = []
    finished: list[int] = []
    in_flight: int = 0
    peak: int = 0

    @property
    def _llm_type(self) -> str:
        return "per-chunk"

    def _reply(self, messages: list[BaseMessage]) -> tuple[int, float, ChatResult]:
        passage = passage_of(messages)
        number = int(re.search(r"Section (\d+)", passage).group(1))
        answer = f"Section {number} is short. It has {number} cats."
        result = ChatResult(generations=[ChatGeneration(message=AIMessage(content=answer))])
        return number, self.delay_s * (10 - number), result

    def _enter(self, number: int) -> None:
        with _LOCK:
            self.started.append(number)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def _leave(self, number: int) -> None:
        with _LOCK:
            self.in_flight -= 1
            self.finished.append(number)

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        number, delay, result = self._reply(messages)
        self._enter(number)
        time.sleep(delay)
        self._leave(number)
        return result

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        number, delay, result = self._reply(messages)
        self._enter(number)
        await asyncio.sleep(delay)
        self._leave(number)
        return result


_LOCK = threading.Lock()


def run(chain: Runnable, **request: Any) -> SimplificationResult:
    return chain.invoke({"grade_level": 6, "subject": "Science", **request})


# --- the verification loop -------------------------------------------------------------------------


def test_hard_then_easy_answer_takes_two_attempts_and_meets_the_target():
    llm = FakeListChatModel(responses=[HARD, EASY])
    result = run(build_simplification_chain(llm), text=HARD)

    assert isinstance(result, SimplificationResult)
    assert len(result.attempts) == 2 and result.target_met
    assert result.simplified_text == EASY
    first, second = result.attempts
    assert first.flesch_kincaid_grade > 7 >= second.flesch_kincaid_grade
    assert not first.accepted and second.accepted and second.feedback is None
    # The feedback names the measured grade and quotes the longest sentence.
    named = re.search(r"measures grade (-?\d+\.\d)", first.feedback)
    assert named and float(named.group(1)) == pytest.approx(first.flesch_kincaid_grade, abs=0.051)
    assert LONGEST_HARD_WORDS in first.feedback and f"({measure(HARD).words} words)" in first.feedback
    assert result.grade_before.flesch_kincaid_grade == first.flesch_kincaid_grade
    assert result.grade_after.flesch_kincaid_grade == second.flesch_kincaid_grade
    assert 1 <= result.grade_after.consensus_grade <= 18
    assert result.facts.found == ["300 billion tonnes", "NASA"] and result.facts.missing == []
    assert result.quantization_level is None and result.task_priority is None  # a plain chat model


def test_retry_prompt_shows_the_previous_answer_and_the_feedback():
    llm = Scripted(replies=[HARD, EASY])
    result = run(build_simplification_chain(llm), text=HARD)
    retry = llm.calls[1]["messages"]
    assert [m.type for m in retry] == ["system", "human", "ai", "human"]
    assert retry[2].content == HARD and retry[3].content == result.attempts[0].feedback
    assert "grades 4-6" in retry[0].content and "Science" in retry[0].content


def test_async_invoke_runs_the_same_loop():
    llm = FakeListChatModel(responses=[HARD, EASY])
    result = asyncio.run(build_simplification_chain(llm).ainvoke({"text": HARD, "grade_level": 6}))
    assert len(result.attempts) == 2 and result.target_met and result.simplified_text == EASY


def test_best_attempt_keeps_most_facts_then_is_closest_to_target():
    source = "In 1969 a crew of three flew to the Moon and came home safely after eight days in space."
    too_hard = (
        "In 1969, an extraordinarily courageous crew of three astronauts travelled to the Moon, "
        "subsequently returning safely to Earth after approximately eight days of continuous spaceflight."
    )
    closer = "In 1969, three brave astronauts travelled to the Moon. They returned safely after eight days in space."
    easiest_but_drops_year = "Three men flew to the Moon. They came home. It took eight days."
    llm = FakeListChatModel(responses=[too_hard, closer, easiest_but_drops_year])
    result = run(build_simplification_chain(llm, tolerance=0), text=source, grade_level=2)

    grades = [a.flesch_kincaid_grade for a in result.attempts]
    assert len(grades) == 3 and grades[0] > grades[1] > 2 and grades[2] <= 2
    assert result.attempts[2].missing_facts == ["1969"]
    assert result.simplified_text == closer  # all facts kept and closest to grade 2 among those
    assert not result.target_met and any("target not met" in note for note in result.notes)
    assert result.attempts[2].feedback is None  # the last attempt sends no feedback


def test_missing_facts_trigger_a_retry_and_are_named_in_the_feedback():
    source = "Apollo 11 landed on the Moon in 1969, about 384,400 km from Earth, with 2 astronauts aboard."
    dropped = "Apollo 11 landed on the Moon in 1969 with two astronauts."
    kept = "Apollo 11 landed on the Moon in 1969. The Moon is 384,400 kilometers from Earth. Two astronauts went."
    llm = FakeListChatModel(responses=[dropped, kept])
    result = run(build_simplification_chain(llm), text=source, grade_level=12)

    assert [f for f in result.facts.found] == ["11", "Moon", "1969", "384,400 km", "Earth", "2"]
    first = result.attempts[0]
    assert first.missing_facts == ["384,400 km", "Earth"] and not first.accepted
    assert '"384,400 km"' in first.feedback and '"Earth"' in first.feedback
    assert result.target_met and len(result.attempts) == 2 and result.facts.missing == []


def test_facts_still_missing_after_all_attempts_are_reported():
    source = "The Nile is about 6,650 km long and flows through Egypt and Sudan."
    llm = FakeListChatModel(responses=["The Nile is a very long river in Egypt."])
    result = run(build_simplification_chain(llm, max_attempts=2), text=source, grade_level=10)
    assert len(result.attempts) == 2
    assert result.facts.missing == ["6,650 km", "Sudan"] and not result.target_met
    assert any("6,650 km" in note for note in result.notes)


def test_empty_answers_are_failed_attempts():
    llm = FakeListChatModel(responses=["", "\x0f\x0f ...\n", EASY])
    result = run(build_simplification_chain(llm, max_attempts=3), text=HARD)
    assert [a.empty for a in result.attempts] == [True, True, False]
    assert "empty" in result.attempts[0].feedback and result.attempts[0].flesch_kincaid_grade is None
    assert result.simplified_text == EASY and result.target_met


def test_all_empty_answers_return_the_original_text_and_say_so():
    llm = FakeListChatModel(responses=["", " "])
    result = run(build_simplification_chain(llm, max_attempts=2), text=HARD)
    assert result.simplified_text == HARD and result.used_original and not result.target_met
    assert len(result.attempts) == 2 and all(a.empty for a in result.attempts)
    assert any("empty" in note and "original" in note for note in result.notes)


def test_answer_wrappers_are_stripped():
    assert clean_answer("Here is the simplified text:\nPlants eat light.") == "Plants eat light."
    assert clean_answer("```\nPlants eat light.\n```") == "Plants eat light."
    assert clean_answer("<passage>\nPlants eat light.\n</passage>") == "Plants eat light."
    assert clean_answer("Note: plants eat light.") == "Note: plants eat light."


# --- chunks and concurrency -------------------------------------------------------------------------


def sections(count: int) -> str:
    return "\n\n".join(
        f"Section {i} explains, with considerable and unnecessary elaboration, that there are exactly {i} cats "
        f"sitting quietly on the long wooden fence."
        for i in range(1, count + 1)
    )


def test_long_text_is_chunked_rewritten_concurrently_and_reassembled_in_order():
    llm = PerChunk()
    result = run(build_simplification_chain(llm, chunk_chars=200), text=sections(6))
    expected = "\n\n".join(f"Section {i} is short. It has {i} cats." for i in range(1, 7))
    assert result.simplified_text == expected and result.chunks == 6
    assert llm.peak > 1  # chunks were in flight together
    assert llm.finished != sorted(llm.finished)  # later chunks finished first, yet the order held
    assert [a.chunk for a in result.attempts] == list(range(6)) and result.target_met


def test_async_chunks_run_concurrently_with_ainvoke_and_keep_order():
    llm = PerChunk()
    chain = build_simplification_chain(llm, chunk_chars=200, max_concurrency=None)
    result = asyncio.run(chain.ainvoke({"text": sections(5), "grade_level": 6}))
    assert result.simplified_text.split("\n\n") == [f"Section {i} is short. It has {i} cats." for i in range(1, 6)]
    assert llm.peak == 5 and llm.finished == [5, 4, 3, 2, 1]


def test_max_concurrency_caps_chunks_in_flight():
    llm = PerChunk(delay_s=0.01)
    chain = build_simplification_chain(llm, chunk_chars=200, max_concurrency=2)
    asyncio.run(chain.ainvoke({"text": sections(5), "grade_level": 6}))
    assert llm.peak == 2


def test_chunking_keeps_paragraphs_and_cuts_oversized_ones_at_sentences():
    paragraph = " ".join(f"Sentence {i} is here." for i in range(40))
    text = f"Short one.\n\n{paragraph}\n\n\n\nShort two."
    chunks = split_into_chunks(text, 200)
    assert all(len(c.text) <= 200 for c in chunks)
    assert all(c.text.rstrip().endswith(".") for c in chunks)  # cut between sentences
    assert join_chunks([c.text for c in chunks], chunks) == f"Short one.\n\n{paragraph}\n\nShort two."
    giant = "word " * 100
    assert all(len(c.text) <= 200 for c in split_into_chunks(giant, 200))


# --- load-aware priority ----------------------------------------------------------------------------


def test_models_with_a_task_priority_field_receive_one():
    llm = PriorityScripted(replies=[EASY], level="int4")
    assert model_accepts_task_priority(llm)
    result = run(build_simplification_chain(llm), text="Plants use light to make sugar from water and air.")
    assert llm.calls[0]["kwargs"] == {"task_priority": "speed"} and result.task_priority == "speed"
    assert result.quantization_level == "int4" and result.attempts[0].quantization_level == "int4"

    llm.calls.clear()
    run(build_simplification_chain(llm), text=HARD + " " + HARD)  # 400 characters or more
    assert llm.calls[0]["kwargs"]["task_priority"] == "balanced"

    llm.calls.clear()
    run(build_simplification_chain(llm, task_priority="Quality"), text=HARD)
    assert llm.calls[0]["kwargs"]["task_priority"] == "quality"

    llm.calls.clear()
    run(build_simplification_chain(llm), text=HARD, task_priority="speed")
    assert llm.calls[0]["kwargs"]["task_priority"] == "speed"


def test_other_models_get_no_extra_kwargs():
    llm = Scripted(replies=[EASY])
    assert not model_accepts_task_priority(llm)
    result = run(build_simplification_chain(llm), text=HARD)
    assert llm.calls[0]["kwargs"] == {} and result.task_priority is None


# --- facts, readability, prompts --------------------------------------------------------------------


def test_fact_extraction_rules():
    text = (
        "The Amazon River carries about 20% of the fresh water that reaches the oceans. In 1542, Francisco de "
        "Orellana travelled 4,800 km along it. The water is 28 °C and 5.5 metres deep. NASA studies CO2 here.\n"
        "Water boils at 100°C. Newton was born in 1643 and 8 billion people live on Earth."
    )
    facts = {f.text: f.kind for f in extract_facts(text)}
    assert facts == {
        "Amazon River": "name", "20%": "quantity", "1542": "number", "Francisco de Orellana": "name",
        "4,800 km": "quantity", "28 °C": "quantity", "5.5 metres": "quantity", "NASA": "name", "CO2": "name",
        "100°C": "quantity", "1643": "number", "8 billion": "quantity", "Earth": "name",
    }  # "The", "In", "Water", and sentence-initial "Newton" are not names (documented limitation)


def test_fact_check_accepts_other_spellings_of_units_and_small_numbers():
    facts = extract_facts("It is 4,800 km long, 28 °C warm, 20% salty and has 3 arms. Visit the Amazon River.")
    kept = check_facts(facts, "It is 4800 kilometres long and 28 degrees Celsius. It is twenty percent salt. "
                              "It has three arms. Visit the amazon river.")
    assert kept.missing == [] and kept.kept_ratio == 1.0
    wrong_unit = check_facts(facts, "It is 4,800 m long, 28 °C, 20% salty, 3 arms, Amazon River.")
    assert wrong_unit.missing == ["4,800 km"]


def test_sentences_and_longest_sentences():
    text = "Dr. Lee met J. K. Rowling in the U.S. capital. It was fun! Was it?\nA heading\nThe end is near."
    assert split_sentences(text) == [
        "Dr. Lee met J. K. Rowling in the U.S. capital.", "It was fun!", "Was it?", "A heading", "The end is near.",
    ]
    assert longest_sentences(text, count=1) == ["Dr. Lee met J. K. Rowling in the U.S. capital."]
    wrapped = "This sentence was wrapped by an editor at a narrow width and\ncontinues on the next line."
    assert split_sentences(wrapped) == [wrapped.replace("\n", " ")]


def test_readability_is_measured_offline():
    score = measure(HARD)
    assert score.flesch_kincaid_grade > 15 and score.sentences == 1 and score.words == 36


@pytest.mark.parametrize(
    "grade, band",
    [(1, "grades 1-3"), (6, "grades 4-6"), (9, "grades 7-9"), (12, "grades 10-12"), (16, "college (grades 13-16)")],
)
def test_grade_bands(grade, band):
    assert grade_band(grade).name == band


def test_prompt_uses_subject_hints_with_a_generic_fallback():
    assert "date" in subject_hint("History") and subject_hint("biology") == subject_hint("SCIENCE")
    assert "key terms" in subject_hint("Underwater Basket Weaving")
    system, human = build_messages("Some text.", 2, "Math")
    assert "grades 1-3" in system.content and "number" in system.content
    assert "<passage>\nSome text.\n</passage>" in human.content


# --- bad input: a clear error, and the model is never called -----------------------------------------


@pytest.mark.parametrize("grade", [0, 17, -1, 6.5, "6.5", "six", None, True, float("nan"), [6]])
def test_bad_grade_is_refused_before_any_model_call(grade):
    llm = Scripted(replies=[EASY])
    with pytest.raises(InvalidValueError) as info:
        run(build_simplification_chain(llm), text=HARD, grade_level=grade)
    message = str(info.value)
    assert "grade_level" in message and repr(grade) in message and "1 to 16" in message
    assert llm.calls == []


@pytest.mark.parametrize("grade, expected", [(1, 1), (16, 16), ("6", 6), (6.0, 6)])
def test_whole_grades_are_accepted(grade, expected):
    result = run(build_simplification_chain(Scripted(replies=[EASY])), text=HARD, grade_level=grade)
    assert result.target_grade == expected


@pytest.mark.parametrize("text", ["", "   \n\t ", "...", 123, None, b"bytes", ["a list"]])
def test_bad_text_is_refused_before_any_model_call(text):
    llm = Scripted(replies=[EASY])
    with pytest.raises(InvalidValueError) as info:
        run(build_simplification_chain(llm), text=text)
    assert "invalid text" in str(info.value) and repr(text) in str(info.value)
    assert llm.calls == []


def test_text_beyond_the_size_limit_names_the_length_and_the_limit(monkeypatch):
    llm = Scripted(replies=[EASY])
    with pytest.raises(InvalidValueError) as info:
        simplify_text("a" * 500_001, llm=llm)
    assert "500001" in str(info.value) and "500,000" in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(InvalidValueError, match="at most 100 characters"):
        run(build_simplification_chain(llm, max_chars=100), text="b" * 101)
    assert llm.calls == []


def test_bad_input_to_the_short_form_builds_no_default_model(monkeypatch):
    def no_model() -> None:
        raise AssertionError("a model was built for bad input")

    monkeypatch.setattr(simplify_module, "_default_model", no_model)
    for kwargs in ({"text": ""}, {"text": HARD, "grade_level": 0}, {"text": HARD, "subject": ""},
                   {"text": HARD, "max_attempts": 0}, {"text": HARD, "tolerance": -1}):
        with pytest.raises(InvalidValueError):
            simplify_text(**kwargs)


def test_bad_input_shapes_and_options():
    llm = Scripted(replies=[EASY])
    chain = build_simplification_chain(llm)
    with pytest.raises(InvalidValueError, match="input"):
        chain.invoke({"text": HARD, "grade": 6})  # a typo must not silently fall back to the default grade
    with pytest.raises(InvalidValueError, match="task priority"):
        chain.invoke({"text": HARD, "task_priority": "fast"})
    for option in ({"tolerance": float("inf")}, {"max_attempts": 11}, {"chunk_chars": 10}, {"max_concurrency": 0}):
        with pytest.raises(InvalidValueError):
            build_simplification_chain(llm, **option)
    assert llm.calls == []


def test_short_form_and_bare_string_input():
    result = simplify_text(HARD, 6, "Science", llm=FakeListChatModel(responses=[EASY]))
    assert result.target_met and result.subject == "Science"
    result = build_simplification_chain(FakeListChatModel(responses=[EASY])).invoke(HARD)
    assert result.target_grade == 8 and result.subject == "Science"


# --- CLI --------------------------------------------------------------------------------------------


def cli(argv: list[str], llm: BaseChatModel) -> int:
    parser = argparse.ArgumentParser(prog="adaptquant")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simplify_command(sub, llm_factory=lambda args: llm)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_simplifies_a_file(tmp_path, capsys):
    path = tmp_path / "passage.txt"
    path.write_text(HARD, encoding="utf-8")
    llm = FakeListChatModel(responses=[HARD, EASY])
    code = cli(["simplify", "--grade", "6", "--subject", "Science", str(path)], llm)
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() == EASY
    assert "target 6 met" in err and "2 attempt(s)" in err and "Flesch-Kincaid" in err


def test_cli_reads_stdin_and_prints_json(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(HARD))
    llm = PriorityScripted(replies=[EASY], level="int8")
    code = cli(["simplify", "--grade", "5", "--attempts", "1", "--tolerance", "2", "--json", "-"], llm)
    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert code == 0 and data["simplified_text"] == EASY and data["target_grade"] == 5
    assert data["quantization_level"] == "int8" and data["tolerance"] == 2.0 and len(data["attempts"]) == 1


@pytest.mark.parametrize("argv, needle", [
    (["simplify", "--grade", "0", "-"], "invalid --grade '0'"),
    (["simplify", "--grade", "six", "-"], "invalid --grade 'six'"),
    (["simplify", "--grade", "6.5", "-"], "invalid --grade '6.5'"),
    (["simplify", "--attempts", "0", "-"], "invalid --attempts '0'"),
    (["simplify", "--tolerance", "-1", "-"], "invalid --tolerance '-1'"),
])
def test_cli_bad_arguments_exit_2(argv, needle, capsys):
    llm = Scripted(replies=[EASY])
    with pytest.raises(SystemExit) as info:
        cli(argv, llm)
    assert info.value.code == 2 and needle in capsys.readouterr().err and llm.calls == []


def test_cli_bad_input_returns_2_without_calling_the_model(tmp_path, monkeypatch, capsys):
    llm = Scripted(replies=[EASY])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert cli(["simplify", str(empty)], llm) == 2
    assert "invalid text" in capsys.readouterr().err
    assert cli(["simplify", str(tmp_path / "missing.txt")], llm) == 2
    assert "cannot read" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(HARD))
    assert cli(["simplify", "--chunk-chars", "5", "-"], llm) == 2
    assert "chunk_chars" in capsys.readouterr().err
    assert llm.calls == []


# --- the evaluation harness -------------------------------------------------------------------------


def test_eval_harness_smoke_with_a_fake_model(tmp_path, capsys):
    module = importlib.import_module("benchmarks.simplify_eval")  # the repository root is on pytest's pythonpath
    assert len(module.PASSAGES) >= 12
    assert all(80 <= len(p.text.split()) <= 200 for p in module.PASSAGES)
    assert len({p.subject for p in module.PASSAGES}) >= 8

    output = tmp_path / "eval.json"
    assert module.main(["--fake", "--limit", "2", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    rows = report["rows"]
    assert len(rows) == 6 and {r["level"] for r in rows} == {"fp16", "int8", "int4"}
    assert all(r["reported_level"] == r["level"] and 1 <= r["attempts"] <= 3 for r in rows)
    assert set(report["summary"]) == {"fp16", "int8", "int4"} and report["meta"]["passages"] == 2
    assert "FK before" in capsys.readouterr().out
