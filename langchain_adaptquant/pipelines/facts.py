"""Facts a simplification must keep: numbers, quantities with units, and proper names.

Rules (regular expressions, no NLP library, so they are predictable and cheap):

* **Numbers** written with digits: integers, thousands separators ("384,400"), decimals ("3.5"),
  ordinals ("19th"), years ("1969"), fractions ("3/4"). Signs are ignored (a range "1914-1918" gives
  two numbers) and so are digits glued to letters ("CO2", "H2O": those are names). Numbers written as
  words in the *source* are not facts; in the *result*, "zero" to "twenty", the tens and "hundred" count
  as their digits, because a rewrite for young readers may spell small numbers out.
* **Quantities**: a number followed by a known unit ("120 km", "5 mg", "37 °C", "45%", "3 hours"), or
  by a scale word and an optional unit ("8 billion", "300 billion tonnes"), or after a currency sign
  ("$20"). Spellings of one unit are interchangeable ("km" = "kilometres", "%" = "percent",
  "$" = "dollars"). A number with a unit is one fact, not two.
* **Names**: runs of capitalized words that do not start a sentence ("the Amazon River", "Gulf of Mexico"
  with a lowercase "of"/"de"/"van"... inside); a run that starts a sentence loses its first word when that
  is a common opener ("In Paris" -> "Paris") and is dropped when it is a single word ("Water boils" -> none:
  we cannot tell a name from an ordinary first word). Acronyms and tokens with inner capitals or digits
  ("DNA", "NASA", "CO2", "iPhone") are names anywhere. Title-case heading lines are skipped. "I" is not a name.

A fact is *kept* when the result contains it: names as whole phrases (case-insensitive, trailing "'s"
ignored), numbers anywhere as numbers (with or without a unit), quantities as the same number with any
spelling of the same unit.
"""

from __future__ import annotations

import re
from typing import Iterable, Literal

from pydantic import BaseModel, Field

from langchain_adaptquant.pipelines.readability import split_sentences

__all__ = ["Fact", "FactCheck", "check_facts", "extract_facts", "UNIT_SPELLINGS"]

FactKind = Literal["number", "quantity", "name"]


class Fact(BaseModel):
    """One fact as written in the source, with the key used to compare it."""

    kind: FactKind
    text: str = Field(description="as written in the source, e.g. '120 km'")
    key: str = Field(description="normalized form, e.g. 'q:120|km'")


class FactCheck(BaseModel):
    """Which source facts survived the rewrite (lists hold the facts as written in the source)."""

    found: list[str] = Field(default_factory=list, description="facts found in the source")
    kept: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)

    @property
    def kept_ratio(self) -> float:
        """Share of source facts kept; 1.0 when the source had none."""
        return len(self.kept) / len(self.found) if self.found else 1.0


#: canonical unit -> its spellings. Case matters for symbols ("m" metre vs "M"), spaces match any whitespace.
UNIT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "km": ("km", "kilometer", "kilometers", "kilometre", "kilometres"),
    "m": ("m", "meter", "meters", "metre", "metres"),
    "cm": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "mm": ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    "µm": ("µm", "μm", "micrometer", "micrometers", "micrometre", "micrometres", "micron", "microns"),
    "nm": ("nm", "nanometer", "nanometers", "nanometre", "nanometres"),
    "mi": ("mi", "mile", "miles"),
    "ft": ("ft", "foot", "feet"),
    "kg": ("kg", "kilogram", "kilograms", "kilo", "kilos"),
    "g": ("g", "gram", "grams", "gramme", "grammes"),
    "mg": ("mg", "milligram", "milligrams"),
    "µg": ("µg", "μg", "mcg", "microgram", "micrograms"),
    "t": ("tonne", "tonnes", "ton", "tons"),
    "lb": ("lb", "lbs", "pound", "pounds"),
    "oz": ("oz", "ounce", "ounces"),
    "L": ("L", "l", "liter", "liters", "litre", "litres"),
    "mL": ("mL", "ml", "milliliter", "milliliters", "millilitre", "millilitres"),
    "°C": ("°C", "° C", "ºC", "degrees Celsius", "degree Celsius", "degrees C", "Celsius"),
    "°F": ("°F", "° F", "ºF", "degrees Fahrenheit", "degree Fahrenheit", "degrees F", "Fahrenheit"),
    "K": ("K", "kelvin", "kelvins"),
    "°": ("°", "degrees", "degree"),
    "%": ("%", "percent", "per cent"),
    "km/h": ("km/h", "kph", "kilometers per hour", "kilometres per hour"),
    "mph": ("mph", "miles per hour"),
    "m/s": ("m/s", "meters per second", "metres per second"),
    "ms": ("ms", "millisecond", "milliseconds"),
    "s": ("s", "sec", "secs", "second", "seconds"),
    "min": ("min", "mins", "minute", "minutes"),
    "h": ("h", "hr", "hrs", "hour", "hours"),
    "day": ("day", "days"),
    "week": ("week", "weeks"),
    "month": ("month", "months"),
    "year": ("year", "years", "yr", "yrs"),
    "century": ("century", "centuries"),
    "light-year": ("light-year", "light-years", "light year", "light years", "ly"),
    "ha": ("ha", "hectare", "hectares"),
    "acre": ("acre", "acres"),
    "kcal": ("kcal", "kilocalorie", "kilocalories"),
    "cal": ("cal", "calorie", "calories", "Calorie", "Calories"),
    "kJ": ("kJ", "kilojoule", "kilojoules"),
    "J": ("J", "joule", "joules"),
    "kWh": ("kWh", "kilowatt-hour", "kilowatt-hours", "kilowatt hour", "kilowatt hours"),
    "W": ("W", "watt", "watts"),
    "kW": ("kW", "kilowatt", "kilowatts"),
    "MW": ("MW", "megawatt", "megawatts"),
    "GW": ("GW", "gigawatt", "gigawatts"),
    "V": ("V", "volt", "volts"),
    "Hz": ("Hz", "hertz"),
    "kHz": ("kHz", "kilohertz"),
    "MHz": ("MHz", "megahertz"),
    "GHz": ("GHz", "gigahertz"),
    "KB": ("KB", "kB", "kilobyte", "kilobytes"),
    "MB": ("MB", "megabyte", "megabytes"),
    "GB": ("GB", "gigabyte", "gigabytes"),
    "TB": ("TB", "terabyte", "terabytes"),
    "bit": ("bit", "bits"),
    "byte": ("byte", "bytes"),
    "mmHg": ("mmHg",),
    "bpm": ("bpm", "beats per minute"),
    "ppm": ("ppm", "parts per million"),
    "mol": ("mol", "mole", "moles"),
    "$": ("dollars", "dollar", "USD"),
    "€": ("euros", "euro", "EUR"),
}

_UNIT_BY_SPELLING: dict[str, str] = {}
for _canonical, _spellings in UNIT_SPELLINGS.items():
    for _spelling in _spellings:
        _UNIT_BY_SPELLING[_spelling] = _canonical
        _UNIT_BY_SPELLING.setdefault(_spelling.lower(), _canonical)


def _spelling_pattern(spelling: str) -> str:
    """'°C' also matches '° C'; words of a multi-word unit may be joined by spaces or hyphens."""
    if spelling[0] in "°º" and len(spelling) > 1:
        return re.escape(spelling[0]) + r"\s*" + re.escape(spelling[1:].strip())
    return r"[\s-]+".join(re.escape(part) for part in re.split(r"[ -]", spelling))


_UNIT_ALTERNATION = "|".join(_spelling_pattern(s) for s in sorted(_UNIT_BY_SPELLING, key=len, reverse=True))
#: Scale words multiply the number; a unit may follow them ("300 billion tonnes" -> "300 billion t").
_SCALES = "thousand|million|billion|trillion"
_DIGITS = r"(?:\d+/\d+(?![\d/])|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)"
_SMALL_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
    "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100",
}


def _quantity_regex(number: str) -> re.Pattern[str]:
    """A number (not glued to letters, not the tail of 'COVID-19'), an optional unit after it, or a
    leading currency sign ('$20'). Units are case-sensitive: 'm' is a metre, 'M' is not a unit."""
    return re.compile(
        r"(?<![\w.,])(?<![A-Za-z]-)(?P<currency>[$€£])?(?P<num>" + number + r")(?P<ord>st|nd|rd|th)?"
        r"(?:\s*-?\s*(?:(?P<scale>" + _SCALES + r")(?:\s+(?P<scaled>" + _UNIT_ALTERNATION + r"))?"
        r"|(?P<unit>" + _UNIT_ALTERNATION + r")))?(?![\w°%/])"
    )


_SOURCE_QUANTITY = _quantity_regex(_DIGITS)
_RESULT_QUANTITY = _quantity_regex(
    _DIGITS + "|(?i:" + "|".join(sorted(_SMALL_NUMBER_WORDS, key=len, reverse=True)) + ")"
)

_TOKEN = re.compile(r"[A-Za-z\u00C0-\u024F0-9][\w\u00C0-\u024F]*(?:['\u2019\-][\w\u00C0-\u024F]+)*(?:['\u2019]s?)?")
_ALWAYS_NAME = re.compile(r"(?:[A-Z][A-Z0-9]*[A-Z][A-Z0-9]*|[A-Z]+\d+[A-Z0-9]*|[a-z]+[A-Z]\w*)(?:-\w+)*")
_CONNECTORS = frozenset({"of", "de", "da", "del", "der", "di", "du", "la", "le", "van", "von", "y"})
_OPENERS = frozenset(
    """a an the in on at by for from to with within into onto of off over under above below across after before
    during since until when while where why how what which who whom whose this that these those it its their
    our his her my your we they he she you there here then thus however although though because if as so
    yet but and or nor many most some each every all both few several no not one two three today later early
    first next finally meanwhile unlike like between among without about around along near once also even
    only just still such other another ancient modern""".split()
)


def _number_key(raw: str) -> str:
    raw = raw.replace(",", "").lower()
    return _SMALL_NUMBER_WORDS.get(raw, raw)


def _unit_key(raw: str) -> str:
    spaced = re.sub(r"[\s-]+", " ", raw.strip())
    for candidate in (spaced, spaced.replace(" ", "-"), spaced.lower(), spaced.replace(" ", "-").lower()):
        if candidate in _UNIT_BY_SPELLING:
            return _UNIT_BY_SPELLING[candidate]
    if spaced.replace(" ", "") in _UNIT_BY_SPELLING:  # "° C"
        return _UNIT_BY_SPELLING[spaced.replace(" ", "")]
    return spaced.lower()


def _quantities(text: str, pattern: re.Pattern[str]) -> list[tuple[str, str, str]]:
    """(as written, number key, unit key or '') for every number in ``text``."""
    found = []
    for match in pattern.finditer(text):
        number = _number_key(match.group("num")) + (match.group("ord") or "").lower()
        unit = match.group("unit")
        if match.group("scale"):
            scaled = match.group("scaled")
            unit_key = match.group("scale") + (" " + _unit_key(scaled) if scaled else "")
            if match.group("currency") and not scaled:  # "$5 million" = "5 million dollars"
                unit_key += " " + match.group("currency")
        elif unit is None and match.group("currency"):
            unit_key = match.group("currency")
        else:
            unit_key = _unit_key(unit) if unit else ""
        found.append((match.group(0).strip(), number, unit_key))
    return found


def _is_heading(line: str) -> bool:
    words = _TOKEN.findall(line)
    if not words or line.rstrip().endswith((".", "!", "?", ":", ";", ",")) or len(words) > 12:
        return False
    return sum(w[0].isupper() for w in words) >= 0.6 * len(words) and len(words) >= 2


def _strip_possessive(token: str) -> str:
    return re.sub(r"['\u2019]s?$", "", token)


def _names_in_sentence(sentence: str) -> list[str]:
    tokens = list(_TOKEN.finditer(sentence))
    names: list[str] = []
    run: list[tuple[int, str]] = []  # (token index, token)

    def close_run() -> None:
        while run and run[-1][1] in _CONNECTORS:
            run.pop()
        if not run:
            return
        words = [t for _, t in run]
        if run[0][0] == 0:  # the run starts the sentence
            if words[0].lower() in _OPENERS or len(words) == 1:
                words = words[1:]
            while words and words[0] in _CONNECTORS:
                words = words[1:]
        words = [w for w in words if w != "I"]
        if words:
            names.append(" ".join(_strip_possessive(w) if i == len(words) - 1 else w for i, w in enumerate(words)))
        run.clear()

    for index, match in enumerate(tokens):
        token = match.group(0)
        joined = bool(run) and sentence[tokens[index - 1].end() : match.start()] == " "
        if run and not joined:
            close_run()
        capitalized = token[0].isupper() and not token[0].isdigit()
        if capitalized:
            run.append((index, token))
            if token.endswith(("'s", "\u2019s")):  # "Newton's law": the name ends here
                close_run()
        elif run and token in _CONNECTORS and run[-1][1] not in _CONNECTORS:
            run.append((index, token))
        else:
            close_run()
    close_run()
    for match in tokens:  # acronyms and mixed tokens are names wherever they are
        token = _strip_possessive(match.group(0))
        if _ALWAYS_NAME.fullmatch(token) and not any(token in n.split() for n in names):
            names.append(token)
    return names


def extract_facts(text: str) -> list[Fact]:
    """Facts of ``text`` in order of first appearance, without duplicates (see the module's rules)."""
    facts: dict[str, Fact] = {}
    for written, number, unit in _quantities(text, _SOURCE_QUANTITY):
        if unit:
            facts.setdefault(f"q:{number}|{unit}", Fact(kind="quantity", text=written, key=f"q:{number}|{unit}"))
        else:
            facts.setdefault(f"n:{number}", Fact(kind="number", text=written, key=f"n:{number}"))
    for sentence in split_sentences(text):
        if _is_heading(sentence):
            continue
        masked = _SOURCE_QUANTITY.sub(lambda m: "#" * len(m.group(0)), sentence)  # "°C" is not a name
        for name in _names_in_sentence(masked):
            key = "p:" + " ".join(name.casefold().split())
            facts.setdefault(key, Fact(kind="name", text=name, key=key))
    # A bare number is redundant when the same number also appears with a unit and is checked there.
    with_units = {f.key[2:].split("|")[0] for f in facts.values() if f.kind == "quantity"}
    ordered = sorted(facts.values(), key=lambda f: _first_position(text, f))
    return [f for f in ordered if not (f.kind == "number" and f.key[2:] in with_units)]


def _first_position(text: str, fact: Fact) -> int:
    position = text.find(fact.text)
    return position if position >= 0 else len(text)


def check_facts(facts: Iterable[Fact], result: str) -> FactCheck:
    """Split ``facts`` into kept and missing for the rewritten ``result``."""
    facts = list(facts)
    numbers: set[str] = set()
    quantities: set[tuple[str, str]] = set()
    for _, number, unit in _quantities(result, _RESULT_QUANTITY):
        numbers.add(number)
        if unit:
            quantities.add((number, unit))
    folded = " ".join(result.casefold().split())
    check = FactCheck(found=[f.text for f in facts])
    for fact in facts:
        if fact.kind == "number":
            kept = fact.key[2:] in numbers
        elif fact.kind == "quantity":
            number, unit = fact.key[2:].split("|", 1)
            kept = (number, unit) in quantities
        else:
            kept = re.search(r"(?<!\w)" + re.escape(fact.key[2:]) + r"(?!\w)", folded) is not None
        (check.kept if kept else check.missing).append(fact.text)
    return check
