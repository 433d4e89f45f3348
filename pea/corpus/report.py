"""The data-quality report of a filter run: `write_report(report, images, captions, out_dir)`.

Writes `quality.json` (rows in/out, drops per reason, thresholds) and three histograms as PNG, each
under a temporary name and then renamed: `hist_image_sizes.png` (original width and height of every
downloaded image, kept vs dropped), `hist_aspect_ratios.png`, `hist_caption_lengths.png` (characters
per kept caption, English and the target language). Returns {name: path}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

HISTOGRAMS = ("image_sizes", "aspect_ratios", "caption_lengths")


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)  # no bbox_inches="tight": it draws the figure twice; the margins are set instead
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _edges(values: np.ndarray, log: bool = False) -> np.ndarray:
    if values.size == 0:
        return np.linspace(0, 1, 11)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.linspace(lo - 0.5, lo + 0.5, 11)
    return np.geomspace(max(lo, 1e-3), hi, 41) if log else np.linspace(lo, hi, 41)


def _stacked(ax: Any, values: np.ndarray, kept: np.ndarray, edges: np.ndarray) -> None:
    """Kept and dropped counts per bin (np.histogram, one pass each), drawn as two filled step outlines:
    two artists per axes however many rows, where plt.hist of the raw values builds a patch per bin."""
    below, _ = np.histogram(values[kept], edges)
    dropped, _ = np.histogram(values[~kept], edges)
    ax.stairs(below, edges, fill=True, label="kept")
    ax.stairs(below + dropped, edges, baseline=below, fill=True, label="dropped")


def write_report(report: dict[str, Any], images: pa.Table, captions: pa.Table, out_dir: Path,
                 language: str) -> dict[str, Path]:
    """`images`: original_width, original_height, kept (bool) of downloaded rows; `captions`: caption_en, caption
    of kept rows. Writes quality.json (with the histogram file names) and the PNGs into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    width = images["original_width"].to_numpy(zero_copy_only=False).astype(float)
    height = images["original_height"].to_numpy(zero_copy_only=False).astype(float)
    kept = images["kept"].to_numpy(zero_copy_only=False).astype(bool)
    paths: dict[str, Path] = {}

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.88, wspace=0.3)
    for ax, values, name in ((axes[0], width, "width"), (axes[1], height, "height")):
        _stacked(ax, values, kept, _edges(values, log=True))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on narrow ranges (and cost a draw)
        ax.set_xlabel(f"original {name} (px)")
        ax.set_ylabel("images")
        ax.legend()
    fig.suptitle(f"{language}: image sizes of {len(width)} downloaded images")
    paths["image_sizes"] = _save(fig, out_dir / "hist_image_sizes.png")

    ratio = np.divide(np.maximum(width, height), np.maximum(np.minimum(width, height), 1))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.16, top=0.9)
    _stacked(ax, ratio, kept, _edges(ratio))
    ax.set_xlabel("aspect ratio (long side / short side)")
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title(f"{language}: aspect ratios")
    paths["aspect_ratios"] = _save(fig, out_dir / "hist_aspect_ratios.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.16, top=0.9)
    lengths = {name: pc.utf8_length(captions[column]).to_numpy(zero_copy_only=False).astype(float)
               for name, column in (("en", "caption_en"), (language, "caption"))}
    top = max([v.max() for v in lengths.values() if v.size] + [1.0])
    edges = np.linspace(0, top + 1, 40)
    for name, values in lengths.items():
        ax.stairs(np.histogram(values, edges)[0], edges, fill=True, alpha=0.6, label=name)
    ax.set_xlabel("characters per caption (after cleaning)")
    ax.set_ylabel("kept pairs")
    ax.legend()
    ax.set_title(f"{language}: caption lengths of {captions.num_rows} kept pairs")
    paths["caption_lengths"] = _save(fig, out_dir / "hist_caption_lengths.png")

    full = {**report, "histograms": {name: path.name for name, path in paths.items()}}
    target = out_dir / "quality.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return paths
