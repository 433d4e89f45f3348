"""Language identification of target captions: `wrong_language(spec, captions)`, the filter's `wrong_language` rule.

lingua-language-detector judges each caption among the target language and `filter.language_id.candidates`;
a caption fails unless the target is lingua's first choice with at least `min_confidence`.
"""

from __future__ import annotations

import pyarrow as pa

from pea.spec import LanguageSpec


def lingua_verdicts(spec: LanguageSpec, captions: list[str]) -> tuple[list[float], list[bool]]:
    """lingua's confidence for the target language, and whether it is lingua's first choice, per caption.

    One pass of `compute_language_confidence_values_in_parallel` gives both: lingua's `detect_language_of`
    is the first of these values unless the second ties it (then it detects nothing), and
    `compute_language_confidence` is the target's value among them."""
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    lid = spec.filter.language_id

    def language(code: str, where: str) -> Language:
        try:
            return Language.from_iso_code_639_1(IsoCode639_1.from_str(code.split("-")[0].lower()))
        except (ValueError, AttributeError):
            raise ValueError(f"{where}: lingua-language-detector does not know the language {code!r}; fix the code "
                             "or set filter.language_id: null to skip the language check") from None

    target = language(spec.language, "language")
    candidates = {target, *(language(c, "filter.language_id.candidates") for c in lid.candidates)}
    if len(candidates) < 2:
        candidates.add(Language.ENGLISH if target != Language.ENGLISH else Language.FRENCH)
    builder = LanguageDetectorBuilder.from_languages(*candidates)
    detector = (builder.with_low_accuracy_mode() if lid.low_accuracy else builder).build()
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



def wrong_language(spec: LanguageSpec, captions: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, int]:
    """Per caption, True where it fails the language rule; and how many captions lingua judged."""
    texts = captions.to_pylist()
    if not texts:
        return pa.array([], pa.bool_()), 0
    confidence, first = lingua_verdicts(spec, texts)
    minimum = spec.filter.language_id.min_confidence
    return pa.array([not f or c < minimum for c, f in zip(confidence, first)], pa.bool_()), len(texts)
