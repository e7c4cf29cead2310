"""Grade-level simplification with measured proof: rewrite, measure, retry with feedback, keep the best.

Works with any LangChain chat model. Each chunk of the input goes through the same loop:

1. ask the model for a rewrite (system message by grade band and subject, see ``prompts``);
2. measure it: Flesch-Kincaid grade and textstat's consensus grade; check the source's facts are in it;
3. accept it when the Flesch-Kincaid grade is at most ``target + tolerance`` and no fact is missing;
   otherwise retry with feedback naming the measured grade, the longest sentences and the missing facts,
   up to ``max_attempts``;
4. keep the best attempt. Scoring, highest first: most source facts kept, then grade within tolerance,
   then closest Flesch-Kincaid grade to the target (absolute difference), then the earlier attempt. An
   accepted attempt always wins; an answer without a single word is a failed attempt and never wins. When every attempt
   of a chunk was empty, that chunk's original text is returned, ``target_met`` is False and a note says so.

Long texts are cut at paragraphs (then sentences) into chunks that fit the model's context and are
rewritten concurrently (threads for ``invoke``, ``asyncio.gather`` over ``ainvoke`` for ``ainvoke``),
then put back in order. Models with a ``task_priority`` field (``ChatAdaptQuant``) receive one as an
invoke kwarg: ``speed`` for short texts, ``balanced`` otherwise, unless overridden.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from langchain_core.language_models import BaseLanguageModel
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import get_executor_for_config
from pydantic import BaseModel, Field

from langchain_adaptquant.control.levels import TaskPriority
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.pipelines import readability
from langchain_adaptquant.pipelines.chunking import (
    MIN_CHUNK_CHARS,
    Chunk,
    chunk_chars_for_context,
    join_chunks,
    split_into_chunks,
)
from langchain_adaptquant.pipelines.facts import Fact, FactCheck, check_facts, extract_facts
from langchain_adaptquant.pipelines.prompts import build_messages, clean_answer, feedback_text
from langchain_adaptquant.pipelines.readability import ReadabilityScore, longest_sentences, measure, word_count
from langchain_adaptquant.pipelines.validation import (
    validate_grade,
    validate_int,
    validate_priority,
    validate_subject,
    validate_text,
    validate_tolerance,
)

__all__ = [
    "Attempt",
    "DEFAULT_GRADE",
    "DEFAULT_MAX_CHARS",
    "DEFAULT_SUBJECT",
    "SimplificationResult",
    "asimplify_text",
    "build_simplification_chain",
    "choose_task_priority",
    "model_accepts_task_priority",
    "simplify_text",
    "validate_request",
]

DEFAULT_GRADE = 8
DEFAULT_SUBJECT = "Science"
DEFAULT_MAX_CHARS = 500_000
DEFAULT_CONTEXT_TOKENS = 4096
DEFAULT_MAX_CONCURRENCY = 4
SHORT_TEXT_CHARS = 400
MAX_ATTEMPTS_LIMIT = 10
_INPUT_KEYS = ("text", "grade_level", "subject", "task_priority")


class Attempt(BaseModel):
    """One answer of the model for one chunk, as measured."""

    chunk: int = Field(description="0-based index of the chunk this attempt rewrote")
    number: int = Field(description="1-based attempt number within its chunk")
    text: str = Field(description="the cleaned answer; empty when it held no word (a failed attempt)")
    empty: bool = False
    flesch_kincaid_grade: Optional[float] = None
    consensus_grade: Optional[float] = None
    missing_facts: list[str] = Field(default_factory=list)
    accepted: bool = Field(False, description="grade within tolerance and no fact missing")
    feedback: Optional[str] = Field(None, description="feedback sent to the model for the next attempt")
    quantization_level: Optional[str] = None
    latency_s: float = 0.0


class SimplificationResult(BaseModel):
    """The rewrite and the numbers that show whether it reached the grade and kept the facts."""

    simplified_text: str
    target_grade: int
    subject: str
    tolerance: float
    target_met: bool = Field(description="Flesch-Kincaid after <= target + tolerance, no fact missing, no fallback")
    grade_before: ReadabilityScore
    grade_after: ReadabilityScore
    facts: FactCheck
    attempts: list[Attempt]
    chunks: int
    used_original: bool = Field(False, description="some chunk kept its original text: all its attempts were empty")
    quantization_level: Optional[str] = Field(
        None, description="level reported by the model for the chosen attempts (most frequent); None if not reported"
    )
    task_priority: Optional[str] = Field(None, description="priority sent to the model; None when it takes none")
    syllable_counter: str = Field(description="'cmudict' or 'pyphen': what textstat counted syllables with")
    elapsed_s: float
    notes: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    tolerance: float
    max_attempts: int
    max_chars: int
    chunk_chars: int
    task_priority: Optional[TaskPriority]
    short_text_chars: int
    max_concurrency: Optional[int]

    @classmethod
    def create(
        cls,
        tolerance: float = 1.0,
        max_attempts: int = 3,
        max_chars: int = DEFAULT_MAX_CHARS,
        chunk_chars: Optional[int] = None,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        task_priority: Union[str, TaskPriority, None] = None,
        short_text_chars: int = SHORT_TEXT_CHARS,
        max_concurrency: Optional[int] = DEFAULT_MAX_CONCURRENCY,
    ) -> "_Options":
        context_tokens = validate_int("context_tokens", context_tokens, 1024)
        return cls(
            tolerance=validate_tolerance(tolerance),
            max_attempts=validate_int("max_attempts", max_attempts, 1, MAX_ATTEMPTS_LIMIT),
            max_chars=validate_int("max_chars", max_chars, 1),
            chunk_chars=(
                chunk_chars_for_context(context_tokens)
                if chunk_chars is None
                else validate_int("chunk_chars", chunk_chars, MIN_CHUNK_CHARS)
            ),
            task_priority=validate_priority(task_priority),
            short_text_chars=validate_int("short_text_chars", short_text_chars, 0),
            max_concurrency=None if max_concurrency is None else validate_int("max_concurrency", max_concurrency, 1),
        )


@dataclass(frozen=True)
class _Request:
    text: str
    grade: int
    subject: str
    priority: Optional[TaskPriority]


def _parse_request(value: Any, options: _Options) -> _Request:
    """Validate one chain input (a dict, or a bare string) before anything else happens."""
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, Mapping) or "text" not in value or set(value) - set(_INPUT_KEYS):
        shown = sorted(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
        raise InvalidValueError(
            "input", shown, "a dict with 'text' and optionally 'grade_level', 'subject', 'task_priority'"
        )
    return _Request(
        text=validate_text(value["text"], options.max_chars),
        grade=validate_grade(value.get("grade_level", DEFAULT_GRADE)),
        subject=validate_subject(value.get("subject", DEFAULT_SUBJECT)),
        priority=validate_priority(value.get("task_priority")),
    )


def model_accepts_task_priority(llm: Any) -> bool:
    """True for ChatAdaptQuant and any model declaring a ``task_priority`` field; others get no extra kwargs.

    ChatAdaptQuant is looked up only if its module is already imported (an instance cannot exist
    otherwise), so checking another provider's model never pays for importing torch.
    """
    module = sys.modules.get("langchain_adaptquant.chat_model")
    chat_adaptquant = getattr(module, "ChatAdaptQuant", None)
    if isinstance(chat_adaptquant, type) and isinstance(llm, chat_adaptquant):
        return True
    return "task_priority" in getattr(type(llm), "model_fields", {})


def choose_task_priority(
    text: str, override: Optional[TaskPriority] = None, short_text_chars: int = SHORT_TEXT_CHARS
) -> TaskPriority:
    """Short texts favour speed (a teacher waits for them); longer ones get the balanced trade-off."""
    if override is not None:
        return override
    return TaskPriority.SPEED if len(text) < short_text_chars else TaskPriority.BALANCED


def _answer_text(response: Any) -> str:
    if isinstance(response, str):
        return response
    content = getattr(response, "content", "")
    if isinstance(content, str):
        return content
    return "".join(
        block if isinstance(block, str) else str(block.get("text", ""))
        for block in content
        if isinstance(block, str) or (isinstance(block, dict) and block.get("type") == "text")
    )


def _level_of(response: Any) -> Optional[str]:
    metadata = getattr(response, "response_metadata", None) or {}
    level = metadata.get("quantization_level")
    return None if level is None else str(getattr(level, "value", level))


class _ChunkLoop:
    """The attempt loop of one chunk, with no I/O, so the sync and async paths share it."""

    def __init__(self, index: int, text: str, request: _Request, options: _Options) -> None:
        self.index = index
        self.source = text
        self.request = request
        self.options = options
        self.facts: list[Fact] = extract_facts(text)
        self.attempts: list[Attempt] = []
        self.messages: list[BaseMessage] = build_messages(text, request.grade, request.subject)
        self.done = False

    def record(self, response: Any, latency_s: float) -> None:
        grade, tolerance = self.request.grade, self.options.tolerance
        answer = clean_answer(_answer_text(response))
        if not word_count(answer):  # whitespace, punctuation or control characters only: nothing to read
            answer = ""
        attempt = Attempt(
            chunk=self.index,
            number=len(self.attempts) + 1,
            text=answer,
            empty=not answer,
            quantization_level=_level_of(response),
            latency_s=round(latency_s, 4),
        )
        if answer:
            score = measure(answer)
            check = check_facts(self.facts, answer)
            attempt.flesch_kincaid_grade = score.flesch_kincaid_grade
            attempt.consensus_grade = score.consensus_grade
            attempt.missing_facts = check.missing
            attempt.accepted = score.flesch_kincaid_grade <= grade + tolerance and not check.missing
        else:
            attempt.missing_facts = [fact.text for fact in self.facts]
        self.attempts.append(attempt)
        if attempt.accepted or attempt.number >= self.options.max_attempts:
            self.done = True
            return
        measured = attempt.flesch_kincaid_grade
        long = longest_sentences(answer, count=3, min_words=4) if answer else []
        attempt.feedback = feedback_text(grade, tolerance, measured, long, attempt.missing_facts if answer else [])
        self.messages = build_messages(
            self.source, grade, self.request.subject, previous_answer=answer or None, feedback=attempt.feedback
        )

    def best(self) -> Optional[Attempt]:
        """See the module docstring for the scoring; None when every attempt was empty."""
        grade, tolerance = self.request.grade, self.options.tolerance
        answered = [a for a in self.attempts if not a.empty and a.flesch_kincaid_grade is not None]
        if not answered:
            return None

        def score(a: Attempt) -> tuple[int, bool, float, int]:
            fk = a.flesch_kincaid_grade or 0.0
            return (len(self.facts) - len(a.missing_facts), fk <= grade + tolerance, -abs(fk - grade), -a.number)

        return max(answered, key=score)


@dataclass
class _ChunkOutcome:
    text: str
    attempts: list[Attempt]
    chosen: Optional[Attempt]


def _finish(loop: _ChunkLoop) -> _ChunkOutcome:
    chosen = loop.best()
    return _ChunkOutcome(text=chosen.text if chosen else loop.source, attempts=loop.attempts, chosen=chosen)


class _Simplifier:
    """Holds the model and options; ``invoke``/``ainvoke`` are the two faces of the chain."""

    def __init__(self, llm: Any, options: _Options) -> None:
        self.llm = llm
        self.options = options
        self.accepts_priority = model_accepts_task_priority(llm)

    def _prepare(self, value: Any) -> tuple[_Request, list[Chunk], dict[str, Any], Optional[str]]:
        request = _parse_request(value, self.options)
        chunks = split_into_chunks(request.text, self.options.chunk_chars)
        kwargs: dict[str, Any] = {}
        priority: Optional[str] = None
        if self.accepts_priority:
            priority = choose_task_priority(
                request.text, request.priority or self.options.task_priority, self.options.short_text_chars
            ).value
            kwargs["task_priority"] = priority
        return request, chunks, kwargs, priority

    def _concurrency(self, config: Optional[RunnableConfig]) -> Optional[int]:
        return (config or {}).get("max_concurrency") or self.options.max_concurrency

    def invoke(self, value: Any, config: Optional[RunnableConfig] = None) -> SimplificationResult:
        started = time.perf_counter()
        request, chunks, kwargs, priority = self._prepare(value)

        def run(index: int) -> _ChunkOutcome:
            loop = _ChunkLoop(index, chunks[index].text, request, self.options)
            while not loop.done:
                t0 = time.perf_counter()
                response = self.llm.invoke(loop.messages, config, **kwargs)
                loop.record(response, time.perf_counter() - t0)
            return _finish(loop)

        if len(chunks) == 1:
            outcomes = [run(0)]
        else:
            with get_executor_for_config({"max_concurrency": self._concurrency(config)}) as executor:
                outcomes = list(executor.map(run, range(len(chunks))))
        return self._result(request, chunks, outcomes, priority, started)

    async def ainvoke(self, value: Any, config: Optional[RunnableConfig] = None) -> SimplificationResult:
        started = time.perf_counter()
        request, chunks, kwargs, priority = self._prepare(value)
        limit = self._concurrency(config)
        gate = asyncio.Semaphore(limit) if limit else None

        async def run(index: int) -> _ChunkOutcome:
            loop = _ChunkLoop(index, chunks[index].text, request, self.options)
            while not loop.done:
                t0 = time.perf_counter()
                if gate is None:
                    response = await self.llm.ainvoke(loop.messages, config, **kwargs)
                else:
                    async with gate:
                        response = await self.llm.ainvoke(loop.messages, config, **kwargs)
                loop.record(response, time.perf_counter() - t0)
            return _finish(loop)

        outcomes = await asyncio.gather(*(run(i) for i in range(len(chunks))))
        return self._result(request, chunks, list(outcomes), priority, started)

    def _result(
        self,
        request: _Request,
        chunks: Sequence[Chunk],
        outcomes: Sequence[_ChunkOutcome],
        priority: Optional[str],
        started: float,
    ) -> SimplificationResult:
        text = join_chunks([o.text for o in outcomes], chunks)
        after = measure(text)
        facts = check_facts(extract_facts(request.text), text)
        limit = request.grade + self.options.tolerance
        fell_back = [i for i, o in enumerate(outcomes) if o.chosen is None]
        notes: list[str] = []
        if fell_back:
            which = "the text" if len(chunks) == 1 else "chunk(s) " + ", ".join(str(i) for i in fell_back)
            notes.append(
                f"every attempt for {which} came back empty; the original text is returned unchanged there"
            )
        if after.flesch_kincaid_grade > limit:
            notes.append(
                f"target not met: the result measures grade {after.flesch_kincaid_grade:.1f} (Flesch-Kincaid), "
                f"above {request.grade} + tolerance {self.options.tolerance:g}"
            )
        if facts.missing:
            notes.append("facts missing from the result: " + ", ".join(facts.missing))
        levels = [o.chosen.quantization_level for o in outcomes if o.chosen and o.chosen.quantization_level]
        return SimplificationResult(
            simplified_text=text,
            target_grade=request.grade,
            subject=request.subject,
            tolerance=self.options.tolerance,
            target_met=not fell_back and after.flesch_kincaid_grade <= limit and not facts.missing,
            grade_before=measure(request.text),
            grade_after=after,
            facts=facts,
            attempts=[a for o in outcomes for a in o.attempts],
            chunks=len(chunks),
            used_original=bool(fell_back),
            quantization_level=Counter(levels).most_common(1)[0][0] if levels else None,
            task_priority=priority,
            syllable_counter=readability.syllable_source(),
            elapsed_s=round(time.perf_counter() - started, 4),
            notes=notes,
        )


def build_simplification_chain(
    llm: Union[BaseLanguageModel, Runnable],
    *,
    tolerance: float = 1.0,
    max_attempts: int = 3,
    max_chars: int = DEFAULT_MAX_CHARS,
    chunk_chars: Optional[int] = None,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    task_priority: Union[str, TaskPriority, None] = None,
    short_text_chars: int = SHORT_TEXT_CHARS,
    max_concurrency: Optional[int] = DEFAULT_MAX_CONCURRENCY,
) -> Runnable[Any, SimplificationResult]:
    """A Runnable from ``{"text", "grade_level", "subject"}`` (or a bare text) to a SimplificationResult.

    ``chunk_chars`` defaults to what fits ``context_tokens`` at ~4 characters per token (see ``chunking``).
    ``task_priority`` overrides the length-based choice for models that take one; a request may override
    it again with a ``"task_priority"`` key. ``max_concurrency`` caps chunks in flight (the config's
    ``max_concurrency`` wins when set). Options are validated here; the input is validated per call,
    before the model is called.
    """
    options = _Options.create(
        tolerance=tolerance,
        max_attempts=max_attempts,
        max_chars=max_chars,
        chunk_chars=chunk_chars,
        context_tokens=context_tokens,
        task_priority=task_priority,
        short_text_chars=short_text_chars,
        max_concurrency=max_concurrency,
    )
    readability.syllable_source()  # fail now, not mid-request, when textstat is missing
    simplifier = _Simplifier(llm, options)
    return RunnableLambda(simplifier.invoke, afunc=simplifier.ainvoke, name="grade_level_simplification")


def validate_request(text: Any, grade_level: Any, subject: Any, **options: Any) -> dict[str, Any]:
    """Validate a request and options without a model (bad input must not load one); returns the chain input."""
    checked = _Options.create(**options)
    _parse_request({"text": text, "grade_level": grade_level, "subject": subject}, checked)
    return {"text": text, "grade_level": grade_level, "subject": subject}


def _default_model() -> Any:
    from langchain_adaptquant.chat_model import ChatAdaptQuant

    return ChatAdaptQuant()


def simplify_text(
    text: str,
    grade_level: int = DEFAULT_GRADE,
    subject: str = DEFAULT_SUBJECT,
    llm: Optional[Union[BaseLanguageModel, Runnable]] = None,
    **options: Any,
) -> SimplificationResult:
    """Rewrite ``text`` for ``grade_level``; ``llm`` defaults to ``ChatAdaptQuant()``.

    ``options`` are those of :func:`build_simplification_chain` (tolerance, max_attempts, max_chars, ...).
    """
    request = validate_request(text, grade_level, subject, **options)
    chain = build_simplification_chain(llm if llm is not None else _default_model(), **options)
    return chain.invoke(request)


async def asimplify_text(
    text: str,
    grade_level: int = DEFAULT_GRADE,
    subject: str = DEFAULT_SUBJECT,
    llm: Optional[Union[BaseLanguageModel, Runnable]] = None,
    **options: Any,
) -> SimplificationResult:
    """The async form of :func:`simplify_text` (chunks run concurrently through ``ainvoke``)."""
    request = validate_request(text, grade_level, subject, **options)
    chain = build_simplification_chain(llm if llm is not None else _default_model(), **options)
    return await chain.ainvoke(request)
