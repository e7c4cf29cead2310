"""How much of a model's 16-bit behaviour a level keeps: probe sets, scores, and the per-model profile.

One definition of each quality fact, used by ``benchmarks/quality.py`` (full measurements) and by
the loader (a small profile measured once per model and level, so the policy can tell a level that
keeps the answers from one that turns them into noise):

* **top-1 agreement**: share of positions of a held-out text where a level's most likely next token
  equals the 16-bit model's. Unlike perplexity it needs no labels and is comparable across models.
* **perplexity** of that text, and its ratio to 16-bit's.
* **probe facts**: short factual/instruction prompts with expected answers, scored by normalized
  "contains" match; only prompts the 16-bit model answers count when comparing a level to it.
* **degenerate repetition**: an answer that repeats one word three times in a row or one 3-word
  phrase three times (the failure of a broken INT2).

The held-out text ships in ``assets/heldout`` (public domain; source in its README).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from langchain_adaptquant.control.levels import QuantizationLevel

HELDOUT_DIR = Path(__file__).resolve().parent.parent / "assets" / "heldout"
HELDOUT_TEXT = HELDOUT_DIR / "alice_ch8_9.txt"
#: Tokens of the held-out text's start that the runtime profile scores: one forward pass, small
#: enough to cost a fraction of a second on a 135M model and a few seconds on a 7B one on CPU.
PROFILE_TOKENS = 256
#: Bump when what the profile measures changes, so stored profiles are not compared across methods.
PROFILE_METHOD = "top1-agreement+ppl-ratio on the first 256 tokens of alice_ch8_9.txt, v1"


@dataclass(frozen=True)
class ProbePrompt:
    """A question with the answers that count as right (any of them, normalized, as a whole word)."""

    prompt: str
    answers: tuple[str, ...]


#: Short facts and instructions a 135M instruction model answers at 16-bit (benchmarks/quality.py
#: prints which it does). Kept easy on purpose: they test what quantization takes away.
PROBE_PROMPTS: tuple[ProbePrompt, ...] = (
    ProbePrompt("What is the capital of France? Answer in one word.", ("paris",)),
    ProbePrompt("What is the capital of Italy? Answer in one word.", ("rome",)),
    ProbePrompt("What is the capital of Japan? Answer in one word.", ("tokyo",)),
    ProbePrompt("What is the capital of Germany? Answer in one word.", ("berlin",)),
    ProbePrompt("What is the capital of Spain? Answer in one word.", ("madrid",)),
    ProbePrompt("What is the capital of England? Answer in one word.", ("london",)),
    ProbePrompt("What is 2 + 2? Answer with a number.", ("4", "four")),
    ProbePrompt("What is 3 + 5? Answer with a number.", ("8", "eight")),
    ProbePrompt("What is 10 minus 3? Answer with a number.", ("7", "seven")),
    ProbePrompt("How many days are in a week? Answer with a number.", ("7", "seven")),
    ProbePrompt("How many legs does a dog have? Answer with a number.", ("4", "four")),
    ProbePrompt("What is the opposite of hot? Answer in one word.", ("cold",)),
    ProbePrompt("What is the opposite of up? Answer in one word.", ("down",)),
    ProbePrompt("What is the opposite of big? Answer in one word.", ("small", "little", "tiny")),
    ProbePrompt("What color is the sky on a clear day? Answer in one word.", ("blue",)),
    ProbePrompt("What color is grass? Answer in one word.", ("green",)),
    ProbePrompt("What do bees make? Answer in one word.", ("honey",)),
    ProbePrompt("What is frozen water called? Answer in one word.", ("ice",)),
    ProbePrompt("Which planet do we live on? Answer in one word.", ("earth",)),
    ProbePrompt("What is the largest ocean on Earth? Answer in one word.", ("pacific",)),
    ProbePrompt("Who wrote Romeo and Juliet? Answer with the name.", ("shakespeare",)),
    ProbePrompt("What language is spoken in Brazil? Answer in one word.", ("portuguese",)),
)


def heldout_text() -> str:
    return HELDOUT_TEXT.read_text(encoding="utf-8")


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def answer_matches(answer: str, expected: Sequence[str]) -> bool:
    """Whether any expected answer appears as a whole word (or phrase) in the normalized answer."""
    padded = f" {_normalize(answer)} "
    return any(f" {_normalize(e)} " in padded for e in expected)


def is_degenerate(answer: str, run: int = 3) -> bool:
    """One word ``run`` times in a row, or one 3-word phrase ``run`` times: a collapsed answer."""
    words = _normalize(answer).split()
    for i in range(len(words) - run + 1):
        if len(set(words[i : i + run])) == 1:
            return True
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - 2):
        gram = tuple(words[i : i + 3])
        grams[gram] = grams.get(gram, 0) + 1
        if grams[gram] >= run:
            return True
    return False


@dataclass(frozen=True)
class TextScore:
    """Summed NLL and top-1 tokens over one text; perplexity and agreement follow."""

    nll: float
    tokens: int
    top1: tuple[int, ...]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def agreement(self, reference: "TextScore") -> float:
        """Share of positions whose top-1 next token equals ``reference``'s (16-bit's)."""
        pairs = list(zip(self.top1, reference.top1))
        return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")


def text_ids(tokenizer: Any, text: str, limit: Optional[int] = None) -> list[int]:
    """The text's token ids after the tokenizer's BOS (or EOS) token, at most ``limit`` predicted tokens."""
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if limit is not None:  # a prefix is enough (tokens are >= 1 char); also keeps tokenizers from
        text = text[: 16 * (limit + 1)]  # warning about texts longer than the model's context
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ([int(first)] if first is not None else []) + list(ids)
    return ids[: limit + 1] if limit is not None else ids


def score_text(model: Any, ids: Sequence[int], window: int = 512) -> TextScore:
    """NLL and top-1 of ids[1:] given what precedes, in windows of ``window`` predicted tokens.

    ``torch.no_grad`` rather than ``inference_mode``: quanto's packed tensors fail under the latter.
    """
    import torch
    import torch.nn.functional as F

    total, top1 = 0.0, []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([list(ids[start : start + window + 1])])
            logits = model(input_ids=chunk).logits[0, :-1].float()
            total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            top1 += logits.argmax(dim=-1).tolist()
    return TextScore(total, len(ids) - 1, tuple(top1))


# -- the per-model profile ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelQuality:
    """What one level kept of 16-bit on the profile's probe text."""

    level: str
    agreement: float
    perplexity_ratio: float
    tokens: int
    seconds: float
    measured_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"agreement": round(self.agreement, 4), "perplexity_ratio": round(self.perplexity_ratio, 4),
                "tokens": self.tokens, "seconds": round(self.seconds, 3), "source": "measured"}


class QualityProfile:
    """Per-level agreement of one loaded model, measured on first visit to each level (thread-safe).

    The 16-bit reference (top-1 tokens and NLL of the probe text) is taken the first time the model
    is at 16-bit; each other level is measured the first time the model is at it *and* the
    reference exists. Levels not yet measured say ``source: "not measured"``. Optionally kept in a
    JSON file (numbers only, nothing executable), keyed by the weights' fingerprint and the
    backends' recipe, so a restart does not measure again.
    """

    def __init__(self, key: str, recipe: str, path: Optional[Path] = None) -> None:
        self.key, self.recipe, self.path = key, recipe, path
        self._reference: Optional[TextScore] = None
        self._levels: dict[str, LevelQuality] = {}
        self._lock = threading.Lock()
        self._load()

    # -- reading -----------------------------------------------------------------------------
    def get(self, level: QuantizationLevel | str) -> Optional[LevelQuality]:
        return self._levels.get(QuantizationLevel.parse(level).value)

    def agreement_map(self) -> dict[QuantizationLevel, float]:
        """Measured agreement per level (16-bit is 1.0 once its reference exists): the policy's input."""
        with self._lock:
            out = {QuantizationLevel.parse(k): v.agreement for k, v in self._levels.items()}
        return out

    def entry(self, level: QuantizationLevel | str) -> dict[str, Any]:
        """The ``quality`` entry of response metadata for ``level``."""
        found = self.get(level)
        return found.to_dict() if found is not None else {"agreement": None, "source": "not measured"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": PROFILE_METHOD,
            "levels": {level.value: self.entry(level) for level in QuantizationLevel},
        }

    @property
    def has_reference(self) -> bool:
        return self._reference is not None

    def needs(self, level: QuantizationLevel) -> bool:
        """Whether visiting ``level`` now would add a measurement."""
        if level is QuantizationLevel.FP16:
            return self._reference is None
        return self._reference is not None and level.value not in self._levels

    # -- measuring -----------------------------------------------------------------------------
    def measure(self, model: Any, ids: Sequence[int], level: QuantizationLevel) -> Optional[LevelQuality]:
        """Score ``model`` (now at ``level``) on ``ids``; keep it if it adds to the profile."""
        if not self.needs(level):
            return None
        started = time.perf_counter()
        score = score_text(model, ids)
        seconds = time.perf_counter() - started
        with self._lock:
            if level is QuantizationLevel.FP16:
                self._reference = score
                result = LevelQuality(level.value, 1.0, 1.0, score.tokens, seconds)
            elif self._reference is not None:
                ratio = score.perplexity / self._reference.perplexity
                result = LevelQuality(level.value, score.agreement(self._reference), ratio, score.tokens, seconds)
            else:
                return None
            self._levels[level.value] = result
        self._save()
        return result

    # -- the optional file ---------------------------------------------------------------------
    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or data.get("key") != self.key or data.get("recipe") != self.recipe \
                or data.get("method") != PROFILE_METHOD:
            return  # other weights, other backends or another method: measure again
        try:
            ref = data.get("reference")
            reference = TextScore(float(ref["nll"]), int(ref["tokens"]), tuple(int(t) for t in ref["top1"])) if ref else None
            levels = {}
            for name, item in (data.get("levels") or {}).items():
                level = QuantizationLevel.parse(name).value
                levels[level] = LevelQuality(level, float(item["agreement"]), float(item["perplexity_ratio"]),
                                             int(item["tokens"]), float(item["seconds"]), float(item["measured_at"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            return  # a damaged file is ignored (and replaced by the next measurement), never trusted in part
        self._reference, self._levels = reference, levels

    def _save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            ref = self._reference
            data = {
                "key": self.key, "recipe": self.recipe, "method": PROFILE_METHOD,
                "reference": {"nll": ref.nll, "tokens": ref.tokens, "top1": list(ref.top1)} if ref else None,
                "levels": {k: asdict(v) for k, v in self._levels.items()},
            }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)
        except OSError:
            pass  # a profile that cannot be kept is measured again next time; never fail serving


def weights_fingerprint(folder: Path) -> str:
    """A cheap identity of the weights in ``folder``: each safetensors file's name, size, header
    (names, dtypes, shapes, offsets) and first and last MiB. Reading a whole 7B file would take
    minutes; a changed tensor that keeps its header and both ends is the one case this misses."""
    import hashlib
    import struct

    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            head = handle.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            digest.update(handle.read(min(header_len, 100 * 2**20)))
            digest.update(handle.read(2**20))
            handle.seek(max(0, size - 2**20))
            digest.update(handle.read(2**20))
    return digest.hexdigest()[:32]


def agreement_entries(profile: Optional[QualityProfile], levels: Sequence[QuantizationLevel]) -> Mapping[str, Any]:
    """``{level: entry}`` for status endpoints; every level says measured or not."""
    if profile is None:
        return {level.value: {"agreement": None, "source": "not measured"} for level in levels}
    return {level.value: profile.entry(level) for level in levels}
