"""Language identification of target captions: `wrong_language(spec, captions)`, the filter's `wrong_language` rule.

lingua-language-detector judges each caption among the target language and `filter.language_id.candidates`;
a caption fails unless the target is lingua's first choice with at least `min_confidence`.

Most captions never need lingua's models: when the scripts of a caption's letters leave one candidate, lingua's
own rules (lingua-rs 1.7 `detect_language_with_rules` / `filter_languages_by_rules`) give that language
confidence 1.0 and the others 0.0. `script_decisions` finds those captions with RE2 over the whole Arrow array
and decides them the same way; lingua judges the rest (mixed scripts, no letters, a script several candidates
write). docs/data.md ("Language identification") has the table; tests/test_langid.py and
benchmarks/filter_throughput.py check the decisions against lingua alone.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pea.spec import LanguageSpec

# lingua's alphabets per language (lingua-rs src/language.rs `alphabets`), by lingua's Language names.
LATIN = frozenset([
    "AFRIKAANS", "ALBANIAN", "AZERBAIJANI", "BASQUE", "BOKMAL", "BOSNIAN", "CATALAN", "CROATIAN", "CZECH",
    "DANISH", "DUTCH", "ENGLISH", "ESPERANTO", "ESTONIAN", "FINNISH", "FRENCH", "GANDA", "GERMAN",
    "HUNGARIAN", "ICELANDIC", "INDONESIAN", "IRISH", "ITALIAN", "LATIN", "LATVIAN", "LITHUANIAN", "MALAY",
    "MAORI", "NYNORSK", "POLISH", "PORTUGUESE", "ROMANIAN", "SHONA", "SLOVAK", "SLOVENE", "SOMALI", "SOTHO",
    "SPANISH", "SWAHILI", "SWEDISH", "TAGALOG", "TSONGA", "TSWANA", "TURKISH", "VIETNAMESE", "WELSH",
    "XHOSA", "YORUBA", "ZULU"
])
CYRILLIC = frozenset([
    "BELARUSIAN", "BULGARIAN", "KAZAKH", "MACEDONIAN", "MONGOLIAN", "RUSSIAN", "SERBIAN", "UKRAINIAN"
])
# Languages in scripts the fast path never decides (their captions always reach lingua: bit OTHER below).
OTHER_SCRIPTS = frozenset([
    "ARABIC", "PERSIAN", "URDU", "HINDI", "MARATHI", "ARMENIAN", "BENGALI", "GEORGIAN", "GREEK", "GUJARATI",
    "HEBREW", "PUNJABI", "TAMIL", "TELUGU", "THAI"
])
KNOWN = LATIN | CYRILLIC | OTHER_SCRIPTS | {"CHINESE", "JAPANESE", "KOREAN"}

# One bit per script class found in a caption. lingua's words are single Han/kana characters, runs of Hangul or
# of the Indic/Thai scripts (digits and signs included), and runs of other letters (\p{L}+), all by Unicode
# Script (not Script_Extensions: '。', 'ー' are Common); Cyrillic and Latin count only as letters. OTHER: a
# letter outside the five scripts (Greek, Arabic, Common letters such as 'ー' that glue neighbours into one
# word, ...) or any character lingua makes a word of in the Indic/Thai scripts: such captions go to lingua.
HAN, KANA, HANGUL, CYR, LAT, OTHER = 1, 2, 4, 8, 16, 32
PATTERNS = ((HAN, r"\p{Han}"), (KANA, r"[\p{Hiragana}\p{Katakana}]"), (HANGUL, r"\p{Hangul}"),
            (CYR, r"[^\P{L}\P{Cyrillic}]"), (LAT, r"[^\P{L}\P{Latin}]"),  # letters only: 'Ⅻ' (Nl) is no word
            (OTHER, (r"[^\P{L}\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Cyrillic}\p{Latin}]"
                    r"|[\p{Bengali}\p{Devanagari}\p{Gujarati}\p{Gurmukhi}\p{Tamil}\p{Telugu}\p{Thai}]")))
LINGUA, PASS, FAIL = 0, 1, 2  # script_decisions' codes


def _languages(spec: LanguageSpec):
    """The target and the set lingua chooses among (at least two, as lingua needs), as lingua Languages."""
    from lingua import IsoCode639_1, Language

    def language(code: str, where: str) -> Language:
        try:
            return Language.from_iso_code_639_1(IsoCode639_1.from_str(code.split("-")[0].lower()))
        except (ValueError, AttributeError):
            raise ValueError(f"{where}: lingua-language-detector does not know the language {code!r}; fix the code "
                             "or set filter.language_id: null to skip the language check") from None

    target = language(spec.language, "language")
    candidates = {target, *(language(c, "filter.language_id.candidates") for c in spec.filter.language_id.candidates)}
    if len(candidates) < 2:
        candidates.add(Language.ENGLISH if target != Language.ENGLISH else Language.FRENCH)
    return target, candidates


def lingua_verdicts(spec: LanguageSpec, captions: list[str]) -> tuple[list[float], list[bool]]:
    """lingua's confidence for the target language, and whether it is lingua's first choice, per caption.

    One pass of `compute_language_confidence_values_in_parallel` gives both: lingua's `detect_language_of`
    is the first of these values unless the second ties it (then it detects nothing), and
    `compute_language_confidence` is the target's value among them."""
    from lingua import LanguageDetectorBuilder

    target, candidates = _languages(spec)
    builder = LanguageDetectorBuilder.from_languages(*candidates)
    detector = (builder.with_low_accuracy_mode() if spec.filter.language_id.low_accuracy else builder).build()
    confidence, first = [], []
    for values in detector.compute_language_confidence_values_in_parallel(captions):
        top = values[0] if values else None
        if top is not None and top.language == target:
            confidence.append(top.value)
            first.append(len(values) == 1 or values[1].value != top.value)
        else:
            confidence.append(next((v.value for v in values if v.language == target), 0.0))
            first.append(False)
    return confidence, first


def script_table(spec: LanguageSpec) -> np.ndarray:
    """Per script class (the OR of the bits above, 0-63): LINGUA, or PASS/FAIL when lingua's rules give one
    candidate confidence 1.0 for every caption of that class. Everything is LINGUA if a candidate is a language
    this table does not know (a newer lingua's), as its script could be any."""
    target, candidates = _languages(spec)
    names = {c.name for c in candidates}
    table = np.full(64, LINGUA, np.int8)
    if not names <= KNOWN:
        return table
    winners = {
        # Every Han character is a word lingua counts as Chinese; without Chinese among the candidates, Han is
        # the alphabet of Japanese alone.
        HAN: "CHINESE" if "CHINESE" in names else "JAPANESE" if "JAPANESE" in names else None,
        KANA: "JAPANESE" if "JAPANESE" in names else None,  # kana: Japanese's alone
        # kana words count as Japanese, Han ones as Chinese, and lingua settles that pair as Japanese; without
        # Chinese among the candidates the Han words count as unknown and lingua may fall to its models.
        KANA | HAN: "JAPANESE" if {"JAPANESE", "CHINESE"} <= names else None,
        HANGUL: "KOREAN" if "KOREAN" in names else None,
        # Hangul with Han is not here: lingua weighs Korean words against Chinese ones ('大韓民國 사람' is Chinese).
        CYR: next(iter(names & CYRILLIC)) if len(names & CYRILLIC) == 1 else None,
        LAT: next(iter(names & LATIN)) if len(names & LATIN) == 1 else None,
    }
    for bits, winner in winners.items():
        if winner is not None:
            table[bits] = PASS if winner == target.name else FAIL
    return table


def script_classes(captions: pa.Array) -> np.ndarray:
    """Per caption, the OR of the script bits its characters show (0: no letters), one RE2 scan per script."""
    classes = np.zeros(len(captions), np.int8)
    for bit, pattern in PATTERNS:
        classes |= bit * pc.match_substring_regex(captions, pattern).to_numpy(zero_copy_only=False).astype(np.int8)
    return classes


def script_decisions(spec: LanguageSpec, captions: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per caption LINGUA, PASS or FAIL, decided from the scripts of its characters alone."""
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    return script_table(spec)[script_classes(pc.fill_null(captions.cast(pa.string()), ""))]


def wrong_language(spec: LanguageSpec, captions: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, int]:
    """Per caption, True where it fails the language rule; and how many captions lingua judged (the others were
    decided from their scripts, as lingua would)."""
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    if not len(captions):
        return pa.array([], pa.bool_()), 0
    captions = pc.fill_null(captions.cast(pa.string()), "")
    decision = script_decisions(spec, captions)
    wrong = decision == FAIL
    ask = decision == LINGUA
    if ask.any():
        confidence, first = lingua_verdicts(spec, pc.filter(captions, pa.array(ask)).to_pylist())
        wrong[ask] = ~np.array(first, bool) | (np.array(confidence) < spec.filter.language_id.min_confidence)
    return pa.array(wrong, pa.bool_()), int(ask.sum())
