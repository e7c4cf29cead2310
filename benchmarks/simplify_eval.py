"""Evaluate grade-level simplification per quantization level: grade hit, facts kept, attempts, latency.

    python -m benchmarks.simplify_eval                       # embedded reference model, fp16,int8,int4
    python -m benchmarks.simplify_eval --model PATH          # any local causal LM, unchanged
    python -m benchmarks.simplify_eval --fake --limit 2      # smoke-test the harness without a model

The passages below were written for this benchmark (80-200 words each, several subjects, each with a
target grade). "Hit" means the Flesch-Kincaid grade of the result is within +-1 of the target, a
stricter test than the pipeline's own acceptance (at most target + tolerance). A tiny model will score
badly: the harness exists so the numbers are measured, not assumed.
"""

from __future__ import annotations

import argparse
import gc
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from benchmarks.common import RESULTS, write_json

DEFAULT_OUTPUT = RESULTS / "simplify_eval.json"
DEFAULT_LEVELS = "fp16,int8,int4"


@dataclass(frozen=True)
class Passage:
    id: str
    subject: str
    grade: int
    text: str


PASSAGES: tuple[Passage, ...] = (
    Passage(
        "photosynthesis", "Science", 6,
        "Photosynthesis is the process by which green plants, algae and certain bacteria capture the energy "
        "of sunlight and store it in the chemical bonds of sugar molecules. Inside the chloroplasts, the "
        "pigment chlorophyll absorbs mostly red and blue light, which is why leaves appear green to our eyes. "
        "The absorbed energy splits water molecules, releasing oxygen as a by-product, while carbon dioxide "
        "taken in through tiny pores called stomata is assembled into glucose. Scientists estimate that "
        "marine algae and cyanobacteria generate roughly 50% of the oxygen in the atmosphere, a contribution "
        "that is frequently overlooked because forests are more visible than the microscopic life of the oceans.",
    ),
    Passage(
        "printing-press", "History", 7,
        "Around 1450, the goldsmith Johannes Gutenberg developed a printing press in Mainz that used movable "
        "metal type, an innovation that dramatically reduced the cost of producing books. Before his invention, "
        "European texts were copied by hand, frequently by monks working in monasteries, and a single Bible "
        "could require more than a year of continuous labour. Gutenberg's workshop produced approximately 180 "
        "copies of his famous Bible, and within fifty years printing shops had appeared in more than 200 "
        "European cities. The rapid circulation of pamphlets later allowed reformers such as Martin Luther to "
        "spread their arguments far beyond the reach of any individual preacher.",
    ),
    Passage(
        "prime-numbers", "Math", 5,
        "A prime number is a whole number greater than 1 whose only positive divisors are 1 and the number "
        "itself. Consequently, 7 is prime, whereas 12 is composite, since it can be divided evenly by 2, 3, 4 "
        "and 6. The Greek mathematician Euclid demonstrated, more than 2,000 years ago, that the collection of "
        "prime numbers never terminates: whatever list of primes you construct, another prime always exists "
        "beyond it. Prime numbers are fundamental to modern cryptography, because multiplying two enormous "
        "primes is computationally straightforward, while recovering the original primes from their product "
        "is extraordinarily difficult.",
    ),
    Passage(
        "nile", "Geography", 4,
        "The Nile, which flows northward through eleven countries in northeastern Africa, is frequently "
        "described as the longest river on Earth, stretching approximately 6,650 km from its remotest sources "
        "to the Mediterranean Sea. Its two principal tributaries, the White Nile and the Blue Nile, converge at "
        "Khartoum, the capital of Sudan. For thousands of years, the annual flooding of the river deposited "
        "fertile silt across the surrounding valley, enabling ancient Egyptian farmers to cultivate wheat and "
        "flax in an otherwise arid landscape. Since the completion of the Aswan High Dam in 1970, however, "
        "the floods have been controlled, and farmers depend on irrigation and artificial fertilizers instead.",
    ),
    Passage(
        "sleep", "Health", 6,
        "Adolescents require approximately 8 to 10 hours of sleep each night, yet surveys consistently indicate "
        "that a majority of teenagers obtain considerably less. During deep sleep, the body releases growth "
        "hormone and repairs tissues, while the brain consolidates memories formed during the day. Chronic sleep "
        "deprivation has been associated with diminished concentration, irritability, weakened immunity and an "
        "elevated risk of accidents. Researchers recommend maintaining a consistent bedtime, limiting caffeine "
        "after midday, and avoiding bright screens for at least 30 minutes before attempting to fall asleep, "
        "because blue light suppresses melatonin, the hormone that signals to the body that night has arrived.",
    ),
    Passage(
        "packets", "Technology", 8,
        "When you send a message across the Internet, your device does not transmit it as a single continuous "
        "stream. Instead, the data is divided into small units called packets, each typically carrying up to "
        "1,500 bytes along with addressing information. Routers examine the destination address of every "
        "packet and forward it toward its target, sometimes along entirely different paths from its neighbours. "
        "At the receiving end, the Transmission Control Protocol, commonly abbreviated as TCP, reassembles the "
        "packets in the correct order and requests retransmission of any that were lost. This design, "
        "developed in the 1970s by Vinton Cerf and Robert Kahn, allows the network to survive failures of "
        "individual connections.",
    ),
    Passage(
        "sonnet", "Literature", 9,
        "A sonnet is a lyric poem of exactly 14 lines, traditionally composed in iambic pentameter, a rhythm "
        "in which each line contains five pairs of unstressed and stressed syllables. The Italian form, "
        "perfected by Francesco Petrarca in the fourteenth century, divides the poem into an octave of eight "
        "lines that presents a problem and a sestet of six lines that responds to it. William Shakespeare, by "
        "contrast, preferred three quatrains followed by a concluding couplet, a structure that frequently "
        "delivers a surprising reversal in its final two lines. Poets have continued to adapt the form, "
        "loosening its rhymes while preserving its compressed, argumentative character.",
    ),
    Passage(
        "inflation", "Economics", 7,
        "Inflation refers to a sustained increase in the general level of prices, which means that each unit "
        "of currency purchases fewer goods and services than it previously did. Economists commonly measure it "
        "with the Consumer Price Index, which tracks the cost of a representative basket of everyday items. "
        "Moderate inflation of about 2% per year is considered healthy by many central banks, including the "
        "European Central Bank, because it encourages spending and investment rather than hoarding. When "
        "inflation accelerates unexpectedly, however, households on fixed incomes suffer, and central banks "
        "typically respond by raising interest rates, making borrowing more expensive and slowing economic "
        "activity.",
    ),
    Passage(
        "water-cycle", "Science", 3,
        "The water cycle describes the continuous movement of water between the oceans, the atmosphere and the "
        "land. Heat from the Sun causes water at the surface of oceans and lakes to evaporate, transforming it "
        "into invisible water vapour that rises into the sky. As the vapour ascends, it cools and condenses "
        "into tiny droplets, which gather together to form clouds. When the droplets become sufficiently heavy, "
        "they fall back to the ground as rain, snow or hail. Some of this precipitation soaks into the soil, "
        "while the remainder flows through rivers back to the sea, where the cycle begins again.",
    ),
    Passage(
        "volcanoes", "Geography", 8,
        "Volcanoes form where molten rock, known as magma, escapes from deep within the Earth through openings "
        "in the crust. Most of them are located along the boundaries of tectonic plates, particularly around "
        "the Pacific Ocean, in a horseshoe-shaped zone nicknamed the Ring of Fire that contains roughly 75% of "
        "the world's active volcanoes. When Mount Vesuvius erupted in 79 AD, clouds of scorching ash and gas "
        "buried the Roman towns of Pompeii and Herculaneum within hours. Although eruptions can be devastating, "
        "volcanic ash eventually weathers into exceptionally fertile soil, which explains why dense farming "
        "communities frequently settle on the slopes of active volcanoes.",
    ),
    Passage(
        "vaccines", "Health", 8,
        "Vaccines train the immune system to recognize a specific pathogen without exposing the body to the "
        "full danger of the disease. Most vaccines contain a weakened or inactivated form of the microbe, or "
        "merely a harmless fragment of it, which prompts white blood cells to produce antibodies and to "
        "establish long-lasting memory cells. If the genuine pathogen later invades, the immune system responds "
        "rapidly enough to prevent serious illness. In 1796, the English physician Edward Jenner demonstrated "
        "that material from cowpox sores could protect people against smallpox, and a worldwide vaccination "
        "campaign coordinated by the World Health Organization eventually eradicated smallpox in 1980.",
    ),
    Passage(
        "fractions", "Math", 4,
        "A fraction represents a part of a whole that has been divided into equal pieces. The number beneath "
        "the line, called the denominator, indicates how many equal pieces the whole contains, while the number "
        "above the line, the numerator, indicates how many of those pieces are being considered. For instance, "
        "if a pizza is cut into 8 equal slices and you consume 3 of them, you have eaten three-eighths of the "
        "pizza. Fractions with different denominators can be compared by converting them to a common "
        "denominator, which reveals that 1/2 and 4/8 represent precisely the same quantity.",
    ),
    Passage(
        "moon-landing", "History", 5,
        "On 20 July 1969, the American astronauts Neil Armstrong and Buzz Aldrin became the first human beings "
        "to walk on the surface of the Moon, while their colleague Michael Collins orbited overhead in the "
        "command module. Their spacecraft, Apollo 11, had been launched from Florida four days earlier atop "
        "a Saturn V rocket, the most powerful machine ever constructed at that time. Approximately 600 million "
        "people watched the grainy television broadcast as Armstrong descended the ladder. The astronauts "
        "collected 21.5 kg of lunar rock and soil, which scientists continue to analyze to understand how the "
        "Moon originated.",
    ),
)


class EchoFirstSentences(BaseChatModel):
    """``--fake``: answers with the first sentences of the passage, reporting the level it was built for."""

    level: str = "fp16"
    sentences: int = 2

    @property
    def _llm_type(self) -> str:
        return "echo-first-sentences"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        prompt = "\n".join(str(m.content) for m in messages if m.type == "human")
        found = re.search(r"<passage>\n?(.*?)\n?</passage>", prompt, re.S)  # the warm-up has none
        passage = found.group(1) if found else prompt
        first = re.split(r"(?<=[.!?])\s+", passage.strip())[: self.sentences]
        message = AIMessage(content=" ".join(first), response_metadata={"quantization_level": self.level})
        return ChatResult(generations=[ChatGeneration(message=message)])


def _real_model(level: str, model: Optional[str], max_tokens: Optional[int]) -> Any:
    from langchain_adaptquant.chat_model import ChatAdaptQuant

    kwargs: dict[str, Any] = {"force_quantization": level}
    if model:
        kwargs["model"] = model
    if max_tokens:
        kwargs["max_tokens"] = max_tokens
    return ChatAdaptQuant(**kwargs)


def evaluate(
    passages: Sequence[Passage],
    levels: Sequence[str],
    make_model: Callable[[str], Any],
    tolerance: float = 1.0,
    max_attempts: int = 3,
) -> list[dict[str, Any]]:
    """One row per (level, passage); the model of a level is built once and released before the next.

    Before timing, textstat is warmed up and each model answers one short prompt, so the first passage's
    latency does not include loading (the warm-up time is reported per row as ``warmup_s``).
    """
    from langchain_adaptquant.pipelines.readability import measure
    from langchain_adaptquant.pipelines.simplify import simplify_text

    measure("Warm up the readability formulas.")
    rows: list[dict[str, Any]] = []
    for level in levels:
        llm = make_model(level)
        started = time.perf_counter()
        llm.invoke([HumanMessage(content="Reply with one short sentence about plants.")])
        warmup_s = round(time.perf_counter() - started, 3)
        for passage in passages:
            started = time.perf_counter()
            result = simplify_text(
                passage.text, passage.grade, passage.subject, llm=llm, tolerance=tolerance, max_attempts=max_attempts
            )
            latency = time.perf_counter() - started
            found = len(result.facts.found)
            rows.append(
                {
                    "passage": passage.id,
                    "subject": passage.subject,
                    "level": level,
                    "reported_level": result.quantization_level,
                    "target_grade": passage.grade,
                    "fk_before": result.grade_before.flesch_kincaid_grade,
                    "fk_after": result.grade_after.flesch_kincaid_grade,
                    "consensus_before": result.grade_before.consensus_grade,
                    "consensus_after": result.grade_after.consensus_grade,
                    "hit_within_1": abs(result.grade_after.flesch_kincaid_grade - passage.grade) <= 1.0,
                    "target_met": result.target_met,
                    "facts_found": found,
                    "facts_kept_pct": round(100.0 * len(result.facts.kept) / found, 1) if found else 100.0,
                    "missing_facts": result.facts.missing,
                    "attempts": len(result.attempts),
                    "used_original": result.used_original,
                    "latency_s": round(latency, 3),
                    "warmup_s": warmup_s,
                    "words_before": result.grade_before.words,
                    "words_after": result.grade_after.words,
                }
            )
        del llm
        gc.collect()
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per level: share of grade hits and of met targets, mean facts kept, attempts and latency."""
    summary: dict[str, dict[str, float]] = {}
    for level in dict.fromkeys(r["level"] for r in rows):
        mine = [r for r in rows if r["level"] == level]
        n = len(mine)
        summary[level] = {
            "passages": n,
            "hit_within_1_pct": round(100.0 * sum(r["hit_within_1"] for r in mine) / n, 1),
            "target_met_pct": round(100.0 * sum(r["target_met"] for r in mine) / n, 1),
            "mean_facts_kept_pct": round(sum(r["facts_kept_pct"] for r in mine) / n, 1),
            "mean_attempts": round(sum(r["attempts"] for r in mine) / n, 2),
            "mean_latency_s": round(sum(r["latency_s"] for r in mine) / n, 3),
        }
    return summary


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = [
        ("level", "level"), ("passage", "passage"), ("target", "target_grade"), ("FK before", "fk_before"),
        ("FK after", "fk_after"), ("hit ±1", "hit_within_1"), ("facts kept %", "facts_kept_pct"),
        ("attempts", "attempts"), ("latency s", "latency_s"),
    ]
    cells = [[h for h, _ in columns]] + [
        ["yes" if r[k] is True else "no" if r[k] is False else str(r[k]) for _, k in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _levels(value: str) -> list[str]:
    from langchain_adaptquant.control.levels import QuantizationLevel

    try:
        return [QuantizationLevel.parse(part).value for part in value.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: a whole number >= 1")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simplify_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=_levels, default=_levels(DEFAULT_LEVELS), help="comma-separated levels")
    parser.add_argument("--model", default=None, help="model folder or cache name (default: embedded reference)")
    parser.add_argument("--fake", action="store_true", help="use an echo model: tests the harness, not a model")
    parser.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N passages")
    parser.add_argument("--attempts", type=_positive, default=3)
    parser.add_argument("--tolerance", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=_positive, default=None, help="generation cap for ChatAdaptQuant")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the JSON goes")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    passages = PASSAGES[: args.limit] if args.limit else PASSAGES
    def make_model(level: str) -> Any:
        if args.fake:
            return EchoFirstSentences(level=level)
        return _real_model(level, args.model, args.max_tokens)

    from langchain_adaptquant.errors import AdaptQuantError

    try:
        rows = evaluate(passages, args.levels, make_model, tolerance=args.tolerance, max_attempts=args.attempts)
    except AdaptQuantError as error:  # bad --tolerance, a model that cannot load, ...
        print(f"simplify_eval: error: {error}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    from importlib.metadata import version

    from langchain_adaptquant.pipelines.readability import syllable_source

    report = {
        "meta": {
            "model": "fake:echo-first-sentences" if args.fake else (args.model or "embedded reference model"),
            "levels": args.levels,
            "passages": len(passages),
            "tolerance": args.tolerance,
            "max_attempts": args.attempts,
            "textstat": version("textstat"),
            "syllable_counter": syllable_source(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "summary": summary,
        "rows": rows,
    }
    write_json(args.output, report)
    print(format_table(rows))
    print()
    for level, numbers in summary.items():
        print(
            f"{level}: hit ±1 {numbers['hit_within_1_pct']}%, target met {numbers['target_met_pct']}%, "
            f"facts kept {numbers['mean_facts_kept_pct']}%, attempts {numbers['mean_attempts']}, "
            f"latency {numbers['mean_latency_s']} s"
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
