"""Every shipped language's captions are readable in the evaluation grids: each character of each prompt in
data/prompts/<lang>/ is drawn with a real glyph, not the missing-glyph box (pea.evaluate.grids, issue #34)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from fontTools.ttLib import TTCollection, TTFont
from PIL import Image

from pea.evaluate.grids import font_for, write_grid

DATA = Path(__file__).resolve().parents[1] / "data"
LANGUAGES = sorted(p.stem for p in (DATA / "languages").glob("*.yaml"))


def _captions(lang: str) -> list[tuple[str, str]]:
    """Every `target<TAB>english` line of the language's prompt sets (comments and blank lines skipped)."""
    lines = [line for path in sorted((DATA / "prompts" / lang).glob("*.txt"))
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    return [(target.strip(), english.strip()) for target, english in (line.split("\t", 1) for line in lines)]


@functools.cache
def _missing_glyph(path: str, index: int) -> str:
    """A private-use character the font has no glyph for: drawing it gives the font's .notdef box."""
    ttf = TTCollection(path, lazy=True).fonts[index] if path.lower().endswith(".ttc") else TTFont(path, lazy=True)
    cmap = ttf.getBestCmap()
    return next(chr(c) for c in range(0xE000, 0xF900) if c not in cmap)


def _bitmap(font, char: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


def test_languages_are_shipped() -> None:
    assert {"zh", "ja", "ko", "ru", "it", "vi"} <= set(LANGUAGES)
    assert all(_captions(lang) for lang in LANGUAGES)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_caption_character_has_a_glyph(lang: str) -> None:
    for target, _ in _captions(lang):
        font, ok = font_for(target)
        assert ok, f"{lang}: no font covers {target!r}"
        box = _bitmap(font, _missing_glyph(font.path, font.index))
        tofu = sorted({c for c in target if not c.isspace() and _bitmap(font, c) == box})
        assert not tofu, f"{lang}: {target!r} draws {tofu} as the missing-glyph box with {font.getname()}"


def test_cjk_captions_use_their_scripts_face() -> None:
    # The regional face, so Chinese reads in Chinese glyph forms, Japanese in Japanese ones; Latin and Cyrillic in
    # DejaVu Sans.
    assert font_for(_captions("zh")[0][0])[0].getname()[0] == "Noto Sans CJK SC"
    assert font_for(_captions("ja")[0][0])[0].getname()[0] == "Noto Sans CJK JP"
    assert font_for(_captions("ko")[0][0])[0].getname()[0] == "Noto Sans CJK KR"
    assert font_for(_captions("ru")[0][0])[0].getname() == ("DejaVu Sans", "Book")  # the regular face, not Bold


def test_write_grid_misses_no_caption(tmp_path: Path) -> None:
    captions = [pair for lang in LANGUAGES for pair in _captions(lang)]
    rows = [[Image.new("RGB", (8, 8), "gray")] * 2 for _ in captions]
    path, missing = write_grid(rows, captions, ["English teacher", "PEA"], tmp_path / "grid.png", cell=32)
    assert missing == []
    assert Image.open(path).size == (64, 18 + len(captions) * (32 + 30))
