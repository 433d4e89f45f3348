"""Caption cleaning per language, vectorized over Arrow: `clean_captions(texts, cleaning, ...)`.

Order: ftfy repairs mojibake, HTML entities and control characters (only on the strings that can need
it, found with one RE2 scan); control and format characters become spaces; the spec's Unicode form;
for target captions the `keep_only` rule (e.g. zh native captions keep CJK, digits and punctuation)
and an OpenCC conversion (e.g. traditional -> simplified); finally runs of whitespace become one
space and the ends are trimmed. Every step but ftfy, the Unicode form and OpenCC runs in Arrow's C++ kernels.
"""

from __future__ import annotations

import functools
import unicodedata

import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pea.spec import CleaningSpec

# Strings ftfy may change: C0/C1 controls, U+FFFD, HTML entities, and mojibake, i.e. a UTF-8 lead byte
# read as Latin-1 (U+00C2-U+00F4) followed by a continuation byte read as Latin-1 or cp1252. A lone
# accented letter (café, perché, việt) does not match, so ftfy (~25 us a string) runs only where needed.
CP1252_SPECIALS = r"\x{152}\x{153}\x{160}\x{161}\x{178}\x{17d}\x{17e}\x{192}\x{2c6}\x{2dc}\x{2013}\x{2014}" \
                  r"\x{2018}-\x{201e}\x{2020}-\x{2022}\x{2026}\x{2030}\x{2039}\x{203a}\x{20ac}\x{2122}"
NEEDS_FTFY = (r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\x{fffd}]|&(?:#[0-9]+|#x[0-9a-fA-F]+|[A-Za-z]+[0-9]*);"
              r"|[\x{c2}-\x{f4}][\x80-\x{bf}" + CP1252_SPECIALS + "]")
FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False, fix_character_width=False, normalization=None,
                                   explain=False)
CONTROL = r"[\p{Cc}\p{Cf}\x{2028}\x{2029}]"
HAN = r"\p{Han}"
NOT_LETTER = r"[^\p{L}\p{M}]"
SPACE = r"[\s\p{Z}]"  # RE2: \s is [\t\n\f\r ]; in ASCII \p{Z} is the space alone


@functools.lru_cache(maxsize=8)
def _opencc(config: str):  # noqa: ANN202 - opencc has no type stubs
    import opencc

    try:
        return opencc.OpenCC(config if config.endswith(".json") else config + ".json")
    except Exception as err:  # noqa: BLE001 - opencc raises a bare RuntimeError for unknown configs
        raise ValueError(f"filter.cleaning.opencc {config!r} is not an OpenCC configuration (e.g. t2s, s2t, t2tw, "
                         f"s2twp): {err}") from None


def _apply(texts: pa.Array, mask: pa.Array, fn) -> pa.Array:  # noqa: ANN001
    """Replace the masked strings by fn(string), calling Python only for those."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return texts
    picked = pc.filter(texts, mask).to_pylist()
    return pc.replace_with_mask(texts, mask, pa.array([fn(t) for t in picked], pa.string()))


def _convert_joined(converter, texts: list[str]) -> list[str]:  # noqa: ANN001
    """OpenCC over many strings in one call: joined by newlines (cleaning has turned every newline into a space
    before this runs, and OpenCC's phrases never span one), converted, split. Per string if the count differs."""
    if not texts:
        return []
    out = converter.convert("\n".join(texts)).split("\n")
    return out if len(out) == len(texts) else [converter.convert(t) for t in texts]


def _apply_many(texts: pa.Array, mask: pa.Array, fn) -> pa.Array:  # noqa: ANN001
    """Replace the masked strings by fn(list of them), one Python call for all."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return texts
    return pc.replace_with_mask(texts, mask, pa.array(fn(pc.filter(texts, mask).to_pylist()), pa.string()))


def clean_captions(texts: pa.Array | pa.ChunkedArray, cleaning: CleaningSpec, *, target: bool,
                   native: pa.Array | pa.ChunkedArray | None = None) -> pa.Array:
    """Cleaned copies of `texts` (nulls become ''); `target` enables keep_only and OpenCC."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if isinstance(native, pa.ChunkedArray):
        native = native.combine_chunks()
    texts = pc.fill_null(texts.cast(pa.string()), "")
    if cleaning.fix_text:
        texts = _apply(texts, pc.match_substring_regex(texts, NEEDS_FTFY),
                       lambda t: ftfy.fix_text(t, FTFY_CONFIG))
    texts = pc.replace_substring_regex(texts, CONTROL, " ")
    if cleaning.unicode_form is not None:
        # Python's unicodedata, not pc.utf8_normalize: with pyarrow 25 here its NFC does not compose (e + U+0301
        # stays two code points). is_normalized is a fast C check, so only unnormalized strings are rebuilt.
        form = cleaning.unicode_form
        values = texts.to_pylist()
        if not all(unicodedata.is_normalized(form, t) for t in values):
            texts = pa.array([t if unicodedata.is_normalized(form, t) else unicodedata.normalize(form, t)
                              for t in values], pa.string())
    if target and cleaning.keep_only is not None:
        applies = pc.match_substring_regex(texts, cleaning.keep_only_if or ".")
        if cleaning.keep_only_for == "native":
            applies = pc.and_(applies, native if native is not None else pa.array([False] * len(texts)))
        kept = pc.replace_substring_regex(texts, f"[^{cleaning.keep_only}]", "")
        texts = pc.if_else(pc.fill_null(applies, False), kept, texts)
    if target and cleaning.opencc is not None:
        converter = _opencc(cleaning.opencc)
        texts = _apply_many(texts, pc.match_substring_regex(texts, HAN),
                            functools.partial(_convert_joined, converter))
    texts = pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, r"[\s\p{Z}]+", " "))  # U+3000 too
    return texts


def _ascii_counts(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per ASCII string: letters ([A-Za-z], ASCII's \\p{L}; no \\p{M} there) and non-space characters, from the
    bytes themselves."""
    kind = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], dtype=kind)[texts.offset: texts.offset + len(texts) + 1].astype(np.int64)
    data = texts.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8)[offsets[0]: offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    offsets = offsets - offsets[0]
    lower = data | 0x20
    letter = (lower >= ord("a")) & (lower <= ord("z"))
    space = (data == 32) | (data == 9) | (data == 10) | (data == 12) | (data == 13)

    def per_string(flags: np.ndarray) -> np.ndarray:
        total = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
        return total[offsets[1:]] - total[offsets[:-1]]

    return per_string(letter), np.diff(offsets) - per_string(space)


def text_ratios(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Letters (\\p{L}, \\p{M}) / non-space characters (not \\s, \\p{Z}; at least 1) per string, as float64: the
    filter's caption_not_text measure. ASCII strings are counted from their bytes with numpy; the rest with RE2."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = pc.fill_null(texts.cast(pa.string()), "")
    letters = np.zeros(len(texts), np.int64)
    nonspace = np.zeros(len(texts), np.int64)
    is_ascii = pc.string_is_ascii(texts).to_numpy(zero_copy_only=False)
    for where, subset in ((is_ascii, True), (~is_ascii, False)):
        if not where.any():
            continue
        picked = pc.filter(texts, pa.array(where))
        if subset:
            letters[where], nonspace[where] = _ascii_counts(picked)
        else:
            letters[where] = pc.utf8_length(pc.replace_substring_regex(picked, NOT_LETTER, "")).to_numpy()
            nonspace[where] = pc.utf8_length(pc.replace_substring_regex(picked, SPACE, "")).to_numpy()
    return pa.array(letters.astype(np.float64) / np.maximum(nonspace, 1), pa.float64())
