"""Image grids for the evaluation: one PNG row per prompt, one column per system, captioned in the target
language and in English, each caption drawn with a font that has its glyphs (DejaVu Sans, the packaged Noto Sans
CJK, or a system font).

    write_grid(rows, captions, [HEADER[s] for s in systems], path) -> (path, captions no font could draw)
"""

from __future__ import annotations

import functools
import os
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Column titles of the evaluation's systems (pea.evaluate.ORDER).
HEADER = {"teacher_en": "English teacher", "trained": "PEA", "paper": "paper's adapter", "untrained": "untrained", "linear_map": "linear map",
          "diffusion_only": "diffusion only", "dictionary": "dictionary", "output_kd": "output KD only",
          "no_native": "PEA w/o native", "perturbed": "PEA, LoRA-noised",
          "aligned": "PEA, aligned tokens", "aligned_perturbed": "aligned + LoRA-noised",
          "attention_perturbed": "attention mix + LoRA-noised"}


# Faces of the Noto Sans CJK collection that the noto-cjk-sans-otc wheel ships (index in its .ttc). All of them
# cover Han, Kana and Hangul; the face picks the regional glyph forms (a Chinese caption in Japanese forms reads wrong).
_JP, _KR, _SC = 0, 1, 2


def _script_face(text: str) -> int | None:
    """The CJK face whose forms fit `text` (Hangul: Korean, Kana: Japanese, Han only: Chinese), None if not CJK."""
    names = [unicodedata.name(c, "") for c in text]
    if any(n.startswith("HANGUL") for n in names):
        return _KR
    if any(n.startswith(("HIRAGANA", "KATAKANA")) for n in names):
        return _JP
    return _SC if any(n.startswith("CJK") for n in names) else None


@functools.cache
def _installed() -> tuple[Path, list[tuple[Path, int]]]:
    """The packaged Noto Sans CJK collection, and DejaVu Sans and the system's fonts (file, face index)."""
    # noto-cjk-sans-otc is a dependency, so every machine can draw zh/ja/ko captions.
    import matplotlib
    from matplotlib import font_manager
    from noto_cjk_sans_otc import FONT_PATH

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"  # the regular face, not Bold
    return Path(str(FONT_PATH)), [(p, 0) for p in [dejavu, *sorted(Path(f) for f in font_manager.findSystemFonts())]]


def _font_files(text: str) -> list[tuple[Path, int]]:
    """Candidates, best first: for CJK text the packaged face of its script, else DejaVu Sans (Latin, Cyrillic,
    Vietnamese) and the system's fonts (other scripts), the CJK faces last (they have Latin and Cyrillic too)."""
    cjk_path, others = _installed()
    face = _script_face(text)
    cjk = [(cjk_path, i) for i in sorted((_SC, _JP, _KR), key=lambda i: i != face)]
    return cjk + others if face is not None else others + cjk


@functools.cache
def _cmap(path: Path, index: int = 0) -> frozenset[int]:
    from fontTools.ttLib import TTCollection, TTFont

    try:
        font = TTCollection(str(path), lazy=True).fonts[index] if path.suffix.lower() in (".ttc", ".otc") \
            else TTFont(str(path), lazy=True)
        return frozenset(font.getBestCmap() or {})
    except Exception:  # an unreadable font file is simply not a candidate
        return frozenset()


def font_for(text: str, size: int = 11) -> tuple[ImageFont.ImageFont, bool]:
    """A font that has a glyph for every character of `text` (and whether one was found)."""
    needed = {ord(c) for c in text if not c.isspace()}
    for path, index in _font_files(text):
        if needed <= _cmap(path, index):
            return ImageFont.truetype(str(path), size, index=index), True
    return ImageFont.load_default(size=size), False


def write_grid(rows: list[list[Image.Image]], captions: list[tuple[str, str]], header: list[str], path: Path,
               cell: int = 128) -> tuple[Path, list[str]]:
    """A PNG grid, one row per prompt captioned `target / english`; returns the captions that no font could
    draw: none for the shipped languages (Latin, Cyrillic, Vietnamese: DejaVu Sans; Chinese, Japanese, Korean: the
    noto-cjk-sans-otc dependency); a new script needs a font with its glyphs, installed on the system."""
    title_font, _ = font_for("".join(header))
    top, label_h = 18, 30
    grid = Image.new("RGB", (cell * len(header), top + len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(header):
        draw.text((col * cell + 4, 3), title, fill="black", font=title_font)
    missing = []
    for r, (images, (target, english)) in enumerate(zip(rows, captions)):
        y = top + r * (cell + label_h)
        font, ok = font_for(target)
        if not ok:
            missing.append(target)
        draw.text((4, y + 1), target, fill="black", font=font)
        draw.text((4, y + 15), english, fill="dimgray", font=font_for(english)[0])
        for col, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (col * cell, y + label_h))
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.save(tmp)
    os.replace(tmp, path)
    return path, missing
