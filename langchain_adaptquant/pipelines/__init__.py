"""Pipelines built on any LangChain chat model; ``simplify`` rewrites text for a school grade and proves it."""

from langchain_adaptquant.pipelines.facts import Fact, FactCheck, check_facts, extract_facts
from langchain_adaptquant.pipelines.readability import ReadabilityScore, measure
from langchain_adaptquant.pipelines.simplify import (
    Attempt,
    SimplificationResult,
    asimplify_text,
    build_simplification_chain,
    simplify_text,
)

__all__ = [
    "Attempt",
    "Fact",
    "FactCheck",
    "ReadabilityScore",
    "SimplificationResult",
    "asimplify_text",
    "build_simplification_chain",
    "check_facts",
    "extract_facts",
    "measure",
    "simplify_text",
]
