"""The baselines of the evaluation table (docs/evaluation.md): what the PEA adapter must beat.

- untrained_like: the exact initialisation training started from (same seed, same config)
- LinearMap: ridge regression from the student's whole token grid to the teacher's, fit on a bounded training sample
"""

from __future__ import annotations

import types

import torch

from pea.method.adapter import PEAAdapter
from pea.train.reader import ShardStream
from pea.train.shards import Shards


def untrained_like(adapter: PEAAdapter, seed: int) -> PEAAdapter:
    torch.manual_seed(seed)
    return PEAAdapter(**{k: v for k, v in adapter.config.items() if not k.startswith("_")}).eval()


class LinearMap(torch.nn.Module):
    """The strongest linear baseline the data allows: ridge regression from the student's whole padded token grid
    (max_length × student_dim, flattened) to the teacher's whole conditioning (its 77 tokens × width, and for SDXL
    its pooled vector), fit on a bounded sample of the training split (the first `max_rows` rows of its seeded
    stream). The output has the teacher's token count, so word order and the teacher's padding states are
    reachable, which a per-token map of the student's tokens cannot do.

    Solved in the dual (kernel) form: W = Xᵀα with α = (XXᵀ + λI)⁻¹Y, so what is kept is X (n × p) and α (n × q),
    never W (p × q: 53k × 59k = 12 GB at SD 1.5 with a 52-token, 1024-wide student). This is why it is not
    scikit-learn's RidgeCV, which materialises W. λ is chosen from a grid by exact leave-one-out error, computed
    for every λ from one eigendecomposition of XXᵀ (the closed form RidgeCV also uses)."""

    LAMBDAS = tuple(10.0 ** k for k in range(-6, 3))  # × mean diagonal of XXᵀ

    def __init__(self, x: torch.Tensor, alpha: torch.Tensor, x_mean: torch.Tensor, y_mean: torch.Tensor,
                 token_shape: tuple[int, int], pooled_dim: int | None, student_dim: int, penalty: float):
        super().__init__()
        for name, value in (("x", x), ("alpha", alpha), ("x_mean", x_mean), ("y_mean", y_mean)):
            self.register_buffer(name, value)
        self.token_shape, self.pooled_dim, self.penalty = token_shape, pooled_dim, penalty
        self.config = types.SimpleNamespace(student_dim=student_dim)  # what pea.models.pipeline checks

    @staticmethod
    def sample(shards: Shards, max_rows: int, seed: int) -> dict[str, torch.Tensor]:
        """Whole parallel rows of a bounded sample and the empty caption, flattened: {"student": (n, L·d), "teacher":
        (n, 77·dim)[, "pooled"]}, read in batches from the training stream; memory O(max_rows × grid widths), never
        the split's tensors."""
        micro = min(256, shards.rows, max_rows)
        parts: dict[str, list[torch.Tensor]] = {"student": [], "teacher": [], "pooled": []}
        with ShardStream(shards, micro, seed, partitions=1) as stream:
            for step in range(-(-min(max_rows, shards.rows) // micro)):
                batch = stream.batch(step)
                pairs = batch.native == 0  # a native-only row has no English side to map to
                parts["student"].append(batch.student[pairs].float().flatten(1))
                parts["teacher"].append(batch.teacher[pairs].float().flatten(1))
                if batch.teacher_pooled is not None:
                    parts["pooled"].append(batch.teacher_pooled[pairs].float())
        rows = {k: torch.cat(v) for k, v in parts.items() if v}
        # And the empty caption: the pipeline's unconditional branch (classifier-free guidance) goes through the map.
        # (The pack keeps no pooled vector for it: an SDXL map extrapolates that row instead.)
        empty = shards.empty()
        extra = {"student": empty["student"], "teacher": empty["teacher"], "pooled": empty.get("teacher_pooled")}
        if all(extra[k] is not None for k in rows):
            rows = {k: torch.cat([v[:max_rows - 1], extra[k].float().reshape(1, -1)]) for k, v in rows.items()}
        return {k: v[:max_rows] for k, v in rows.items()}

    @classmethod
    def fit(cls, shards: Shards, max_rows: int, seed: int) -> LinearMap:
        sample = cls.sample(shards, max_rows, seed)
        x, y = sample["student"], torch.cat([sample["teacher"], sample.get("pooled", sample["teacher"][:, :0])], dim=1)
        x_mean, y_mean = x.mean(0), y.mean(0)
        x, y = x - x_mean, y - y_mean
        values, vectors = torch.linalg.eigh(_gram(x, x))
        values = values.clamp(min=0)
        projected = vectors.T @ y.double()
        scale = float(values.mean()) or 1.0
        best = None
        for factor in cls.LAMBDAS:
            inverse = 1.0 / (values + factor * scale)
            alpha = vectors @ (inverse[:, None] * projected)
            # Leave-one-out residual of row i: α_i / [(K + λI)⁻¹]_ii (exact for ridge regression).
            diagonal = (vectors.pow(2) * inverse).sum(dim=1)
            loo = float((alpha / diagonal[:, None]).pow(2).sum())
            if best is None or loo < best[0]:
                best = (loo, factor, alpha)
        _, factor, alpha = best
        token_shape = tuple(shards.tensors["teacher"][0])
        pooled = shards.tensors["teacher_pooled"][0][-1] if "pooled" in sample else None
        student_dim = shards.tensors["student"][0][-1]
        return cls(x, alpha, x_mean, y_mean, token_shape, pooled, student_dim, factor).eval()

    @property
    def device(self) -> torch.device:
        return self.alpha.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = states.to(self.dtype).flatten(1) - self.x_mean
        out = (_gram(rows, self.x) @ self.alpha).to(self.dtype) + self.y_mean
        width = self.token_shape[0] * self.token_shape[1]
        tokens = out[:, :width].reshape(len(out), *self.token_shape)
        return tokens, (out[:, width:] if self.pooled_dim else None)


def _gram(a: torch.Tensor, b: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """a @ b.T accumulated in float64 over column chunks: a small penalty leaves the dual solve ill-conditioned,
    and float32 products lose ~2 % of it; chunks keep the float64 copies small (the grid is 53k wide at SD 1.5)."""
    out = torch.zeros(len(a), len(b), dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], chunk):
        out += a[:, start:start + chunk].double() @ b[:, start:start + chunk].double().T
    return out
