"""The data-quality report of a filter run: `write_report(report, data, out_dir, language)`.

Writes `quality.json` (rows in/out, drops per reason, thresholds) and three histograms as PNG, each
under a temporary name and then renamed: `hist_image_sizes.png` (original width and height of every
downloaded image, kept vs dropped), `hist_aspect_ratios.png`, `hist_caption_lengths.png` (characters
per kept caption, English and the target language). Returns {name: path}. The filter fills `ReportData`
while it streams (bin counts only), so the report's memory does not grow with the corpus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from pea.io.atomic import publish  # noqa: E402

HISTOGRAMS = ("image_sizes", "aspect_ratios", "caption_lengths")


def _save(fig: Any, path: Path) -> Path:
    # A temp name of its own (two runs over one lake must not rename each other's file); format named, as the
    # temp name does not end in .png.
    with publish(path, "filter: report histogram") as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # no bbox_inches="tight": it draws twice; the margins are set instead
    plt.close(fig)
    return path


def _edges(lo: float | None, hi: float | None, log: bool = False) -> np.ndarray:
    """Bin edges over [lo, hi]: 40 bins (geometric when `log`), or 10 around a single value."""
    if lo is None or hi is None:
        return np.linspace(0, 1, 11)
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        return np.linspace(lo - 0.5, lo + 0.5, 11)
    return np.geomspace(max(lo, 1e-3), hi, 41) if log else np.linspace(lo, hi, 41)


@dataclass
class Histogram:
    """Counts per bin for named series, added batch by batch (np.histogram with fixed edges sums exactly)."""

    edges: np.ndarray
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, series: str, values: np.ndarray) -> None:
        counts = np.histogram(values, self.edges)[0]
        self.counts[series] = self.counts.get(series, np.zeros_like(counts)) + counts


# Over the final view of the filter (one row per raw row, `reason` NULL where kept): bounds first, then batches.
IMAGE_BOUNDS = """SELECT min(original_width), max(original_width), min(original_height), max(original_height),
    min(greatest(original_width, original_height)::DOUBLE / greatest(least(original_width, original_height), 1)),
    max(greatest(original_width, original_height)::DOUBLE / greatest(least(original_width, original_height), 1)),
    count(*) FROM final WHERE status = 'success'"""
IMAGES = "SELECT original_width, original_height, reason IS NULL AS kept FROM final WHERE status = 'success'"
CAPTION_BOUNDS = "SELECT max(length(caption_en)), max(length(caption)) FROM final WHERE reason IS NULL"


@dataclass
class ReportData:
    """The histograms' data, aggregated while the filter streams: memory is a few arrays of 40 bins."""

    lengths: Histogram
    images: dict[str, Histogram] = field(default_factory=dict)  # width, height, ratio -> kept/dropped
    image_rows: int = 0
    pair_rows: int = 0

    @classmethod
    def start(cls, con: Any) -> ReportData:
        top = max([v for v in con.execute(CAPTION_BOUNDS).fetchall()[0] if v is not None] + [1])
        return cls(lengths=Histogram(np.linspace(0, top + 1, 40)))

    def add_pairs(self, batch: pa.RecordBatch) -> None:
        self.pair_rows += batch.num_rows
        for series, column in (("en", "caption_en"), ("target", "caption")):
            self.lengths.add(series, pc.utf8_length(batch.column(column)).to_numpy(zero_copy_only=False))

    def add_images(self, con: Any, batch_rows: int = 1_000_000) -> None:
        w_lo, w_hi, h_lo, h_hi, r_lo, r_hi, self.image_rows = con.execute(IMAGE_BOUNDS).fetchall()[0]
        self.images = {"width": Histogram(_edges(w_lo, w_hi, log=True)),
                       "height": Histogram(_edges(h_lo, h_hi, log=True)), "ratio": Histogram(_edges(r_lo, r_hi))}
        for batch in con.sql(IMAGES).to_arrow_reader(batch_rows):
            width = batch.column("original_width").to_numpy(zero_copy_only=False).astype(float)
            height = batch.column("original_height").to_numpy(zero_copy_only=False).astype(float)
            kept = batch.column("kept").to_numpy(zero_copy_only=False).astype(bool)
            ratio = np.divide(np.maximum(width, height), np.maximum(np.minimum(width, height), 1))
            for name, values in (("width", width), ("height", height), ("ratio", ratio)):
                self.images[name].add("kept", values[kept])
                self.images[name].add("dropped", values[~kept])


def _stacked(ax: Any, histogram: Histogram) -> None:
    """Kept and dropped counts per bin drawn as two filled step outlines: two artists per axes however many rows."""
    below = histogram.counts.get("kept", np.zeros(len(histogram.edges) - 1, np.int64))
    dropped = histogram.counts.get("dropped", np.zeros_like(below))
    ax.stairs(below, histogram.edges, fill=True, label="kept")
    ax.stairs(below + dropped, histogram.edges, baseline=below, fill=True, label="dropped")


def write_report(report: dict[str, Any], data: ReportData, out_dir: Path, language: str) -> dict[str, Path]:
    """Writes quality.json (`report` with the histogram file names) and the PNGs of `data` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if not data.images:
        data.images = {name: Histogram(_edges(None, None)) for name in ("width", "height", "ratio")}

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.88, wspace=0.3)
    for ax, name in ((axes[0], "width"), (axes[1], "height")):
        _stacked(ax, data.images[name])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on narrow ranges (and cost a draw)
        ax.set_xlabel(f"original {name} (px)")
        ax.set_ylabel("images")
        ax.legend()
    fig.suptitle(f"{language}: image sizes of {data.image_rows} downloaded images")
    paths["image_sizes"] = _save(fig, out_dir / "hist_image_sizes.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.16, top=0.9)
    _stacked(ax, data.images["ratio"])
    ax.set_xlabel("aspect ratio (long side / short side)")
    ax.set_ylabel("images")
    ax.legend()
    ax.set_title(f"{language}: aspect ratios")
    paths["aspect_ratios"] = _save(fig, out_dir / "hist_aspect_ratios.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.16, top=0.9)
    edges = data.lengths.edges
    for series, name in (("en", "en"), ("target", language)):
        ax.stairs(data.lengths.counts.get(series, np.zeros(len(edges) - 1)), edges, fill=True, alpha=0.6, label=name)
    ax.set_xlabel("characters per caption (after cleaning)")
    ax.set_ylabel("kept pairs")
    ax.legend()
    ax.set_title(f"{language}: caption lengths of {data.pair_rows} kept pairs")
    paths["caption_lengths"] = _save(fig, out_dir / "hist_caption_lengths.png")

    full = {**report, "histograms": {name: path.name for name, path in paths.items()}}
    target = out_dir / "quality.json"
    with publish(target, "filter: report") as tmp:
        tmp.write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths
