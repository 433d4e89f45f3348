"""The baselines of the evaluation table (docs/evaluation.md): what the PEA adapter must beat.

- untrained_like: the exact initialisation training started from (same seed, same config)
- LinearMap: the student's states through a least-squares affine map, fit on a bounded training sample
- word_by_word: a dictionary translation with the synthetic lexicon (the paper's translation baseline in miniature)
"""

from __future__ import annotations

import types

import torch

from pea.adapter import PEAAdapter
from pea.corpus.synthetic import ENGLISH
from pea.reader import ShardStream
from pea.shards import Shards
from pea.spec import SyntheticCaptions



def untrained_like(adapter: PEAAdapter, seed: int) -> PEAAdapter:
    torch.manual_seed(seed)
    return PEAAdapter(**{k: v for k, v in adapter.config.items() if not k.startswith("_")}).eval()


class LinearMap(torch.nn.Module):
    """The student's per-token states through one affine map into the teacher's token space (and, for SDXL,
    the token mean through a second into its pooled vector). Fit by least squares on a bounded sample of the
    training split (the first `max_rows` rows of its seeded stream): token counts differ between the two
    encoders, so the fit pairs each caption's mean student state with its mean teacher token (the map is
    affine, so the mean of its outputs is the map of the mean)."""

    def __init__(self, tokens: torch.Tensor, pooled: torch.Tensor | None, student_dim: int):
        super().__init__()
        self.register_buffer("w_tokens", tokens)
        self.register_buffer("w_pooled", pooled if pooled is not None else torch.empty(0))
        self.has_pooled = pooled is not None
        self.config = types.SimpleNamespace(student_dim=student_dim)  # what pea.pipeline checks

    @staticmethod
    def sample(shards: Shards, max_rows: int, seed: int) -> dict[str, torch.Tensor]:
        """Per-row means of a bounded sample: {"student": (n, d), "teacher": (n, dim)[, "pooled": (n, p)]}, read
        in batches from the training stream; memory O(max_rows × widths), never the tensors of the split."""
        micro = min(256, shards.rows, max_rows)
        parts: dict[str, list[torch.Tensor]] = {"student": [], "teacher": [], "pooled": []}
        with ShardStream(shards, micro, seed, partitions=1) as stream:
            for step in range(-(-min(max_rows, shards.rows) // micro)):
                batch = stream.batch(step)
                parts["student"].append(batch.student.float().mean(dim=1))
                parts["teacher"].append(batch.teacher.float().mean(dim=1))
                if batch.teacher_pooled is not None:
                    parts["pooled"].append(batch.teacher_pooled.float())
        return {k: torch.cat(v)[:max_rows] for k, v in parts.items() if v}

    @classmethod
    def fit(cls, shards: Shards, max_rows: int, seed: int) -> LinearMap:
        sample = cls.sample(shards, max_rows, seed)
        x = torch.cat([sample["student"], torch.ones(len(sample["student"]), 1)], dim=1)
        tokens = torch.linalg.lstsq(x, sample["teacher"], driver="gelsd").solution
        pooled = torch.linalg.lstsq(x, sample["pooled"], driver="gelsd").solution if "pooled" in sample else None
        return cls(tokens, pooled, x.shape[1] - 1).eval()

    @property
    def device(self) -> torch.device:
        return self.w_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w_tokens.dtype

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        states = states.to(self.dtype)
        tokens = states @ self.w_tokens[:-1] + self.w_tokens[-1]
        pooled = states.mean(dim=1) @ self.w_pooled[:-1] + self.w_pooled[-1] if self.has_pooled else None
        return tokens, pooled


def word_by_word(text: str, captions: SyntheticCaptions) -> str:
    """The target prompt translated word by word into English with the synthetic lexicon, kept in the target's
    word order (what a dictionary, not a translation model, gives). Longest match first; words the lexicon lacks
    (particles, glue) are dropped. Space-separated languages match whole words (else a word's longest lexicon
    prefix), others match characters."""
    lexicon: dict[str, str] = {}
    for slot in ("counts", "colors", "shapes", "positions"):
        for key, word in getattr(captions, slot).items():
            lexicon.setdefault(word.strip(), getattr(ENGLISH, slot)[key])
    spaced = " " in text.strip() or any(" " in w for w in lexicon)
    units = [u.strip(".,;:!?\"'()") for u in text.split()] if spaced else list(text)
    glue = " " if spaced else ""
    longest = max(len(w.split()) if spaced else len(w) for w in lexicon)
    out, i = [], 0
    while i < len(units):
        for j in range(min(len(units), i + longest), i, -1):
            if (english := lexicon.get(glue.join(units[i:j]))) is not None:
                out.append(english)
                i = j
                break
        else:  # an inflected or agglutinated word (Korean 왼쪽에 = 왼쪽 + 에): its longest lexicon prefix, if any
            stems = [w for w in lexicon if spaced and " " not in w and units[i].startswith(w)]
            if stems:
                out.append(lexicon[max(stems, key=len)])
            i += 1
    return " ".join(out)
