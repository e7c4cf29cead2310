"""The simplification pipeline on the embedded reference model: the mechanics, not the quality.

A tiny model cannot be expected to hit a grade; this checks that a real ChatAdaptQuant goes through
the loop: a non-empty result, attempts within the limit, grades measured, a level reported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from langchain_adaptquant.chat_model import ChatAdaptQuant  # noqa: E402
from langchain_adaptquant.control.levels import QuantizationLevel  # noqa: E402
from langchain_adaptquant.pipelines import simplify_text  # noqa: E402

PASSAGE = (
    "Photosynthesis is the process by which green plants capture the energy of sunlight and store it in "
    "sugar. Chlorophyll in the leaves absorbs red and blue light, and the plant releases oxygen."
)


@pytest.mark.slow
def test_simplify_text_runs_on_the_reference_model():
    result = simplify_text(PASSAGE, grade_level=6, subject="Science", llm=ChatAdaptQuant(max_tokens=48), max_attempts=2)

    assert result.simplified_text.strip()
    assert 1 <= len(result.attempts) <= 2
    assert result.grade_before.flesch_kincaid_grade > 0 and result.grade_after.consensus_grade >= 1
    assert all(a.empty or a.flesch_kincaid_grade is not None for a in result.attempts)
    assert result.quantization_level in {level.value for level in QuantizationLevel}
    assert result.task_priority == "speed"  # a short text, and ChatAdaptQuant takes a priority
