"""Progress bars that read well in a terminal and in a log file (a Prefect worker's, CI's, `> run.log`).

    for step in bar(range(n), desc="train adapter", unit="step"): ...

In a terminal: tqdm as usual, redrawn every 2 s. Anywhere else: one plain line every `LOG_INTERVAL_S` and one at
the end. tqdm redraws in place with carriage returns, which a log file keeps: one run of the main job wrote
320 KB of redraws, one per training step. `for_logs()` also quiets the libraries' own per-file bars there.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0  # a five-minute stage: five lines


def interactive() -> bool:
    """Whether stderr, where the bars go, is a terminal."""
    return sys.stderr.isatty()


class _Lines:
    """A file for tqdm that writes each redraw as its own line (no carriage returns) and drops blank ones."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Any = None, **options: Any) -> tqdm:
    """tqdm with `options`, paced for where stderr goes (a terminal, or a log)."""
    if interactive():
        return tqdm(iterable, mininterval=2, **options)
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 2,
                ascii=True, ncols=100, **options)


def for_logs() -> None:
    """Outside a terminal, turn off the per-file bars of Hugging Face's libraries (one per saved or loaded model)."""
    if interactive():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
