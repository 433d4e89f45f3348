"""Image grids for the evaluation: one PNG row per prompt, one column per system, captioned in the target
language and in English, each caption drawn with an installed font that has its glyphs.

    write_grid(rows, captions, [HEADER[s] for s in systems], path) -> (path, captions no font could draw)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Column titles of the evaluation's systems (pea.evaluate.ORDER).
HEADER = {"teacher_en": "English teacher", "trained": "PEA", "paper": "paper's adapter", "untrained": "untrained", "linear_map": "linear map",
          "diffusion_only": "diffusion only", "dictionary": "dictionary", "output_kd": "output KD only",
          "no_native": "PEA w/o native", "perturbed": "PEA, LoRA-noised",
          "aligned": "PEA, aligned tokens", "aligned_perturbed": "aligned + LoRA-noised",
          "attention_perturbed": "attention mix + LoRA-noised"}


def _font_files() -> list[Path]:
    import matplotlib
    from matplotlib import font_manager

    found = [Path(p) for p in font_manager.findSystemFonts()]
    found += sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVuSans*.ttf"))
    # Prefer fonts with wide coverage (CJK) first, then DejaVu Sans (Latin, Cyrillic, Vietnamese).
    return sorted(found, key=lambda p: (not any(k in p.name.lower() for k in ("cjk", "han", "wqy", "droid")),
                                         "dejavusans" not in p.name.lower().replace("-", ""), p.name))


@functools.lru_cache(maxsize=None)
def _cmap(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTCollection, TTFont

    try:
        font = TTCollection(str(path)).fonts[0] if path.suffix.lower() == ".ttc" else TTFont(str(path), lazy=True)
        return frozenset(font.getBestCmap() or {})
    except Exception:  # an unreadable font file is simply not a candidate
        return frozenset()


def font_for(text: str, size: int = 11) -> tuple[ImageFont.ImageFont, bool]:
    """A font that has a glyph for every character of `text` (and whether one was found)."""
    needed = {ord(c) for c in text if not c.isspace()}
    for path in _font_files():
        if needed <= _cmap(path):
            return ImageFont.truetype(str(path), size), True
    return ImageFont.load_default(size=size), False


def write_grid(rows: list[list[Image.Image]], captions: list[tuple[str, str]], header: list[str], path: Path,
               cell: int = 128) -> tuple[Path, list[str]]:
    """A PNG grid, one row per prompt captioned `target / english`; returns the captions that no installed
    font could draw (install a CJK font such as fonts-noto-cjk to see them)."""
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
