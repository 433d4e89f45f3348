"""The streaming reader: one rank's micro-batches from packed shards (pea.train.shards), memory O(shuffle window).

    stream = ShardStream(shards, micro_batch=8, seed=0, rank=0, world=2, partitions=2)
    batch = stream.batch(i)      # micro-step i: teacher, teacher_pooled, student, latents, native

The order is a pure function of (seed, partitions, world size, the pack) and of nothing else:
- epoch e: the pack's row groups are permuted by a generator seeded with (seed, e) and dealt round-robin to
  P partitions; partition p reads its row groups in windows of `shuffle_row_groups`, and each window's rows
  are permuted by a generator seeded with (seed, e, p, window);
- global micro-batch b of epoch e takes the next g = micro × world / P rows of every partition's stream,
  partition 0 first. Rank r of W owns partitions [r·P/W, (r+1)·P/W): its micro-batch is exactly its slice of
  the global batch, and it reads only those partitions' row groups, no one else's;
- an epoch has as many global batches as its shortest partition fills; rows left over are dealt again, to
  other partitions, in later epochs.
So one process and two with the same global batch and partitions see the same rows at the same positions of
every global batch; a resume at micro-step i (after kill -9) reads exactly what the lost run would have read;
a resume with another world size that still divides P is exact too, while other layouts change the order.

Memory per rank: the windows in use and those read ahead, per owned partition — (P/W) × (1 + prefetch) ×
shuffle_row_groups × row_group_rows × bytes per row, in the stores' 16-bit dtype — and never the corpus: the
epoch plan is one integer per row group. Windows are read by background threads (`prefetch` ahead), so reads
overlap training; pyarrow releases the GIL while it reads.

Written here rather than taken from a library (docs/architecture.md has the comparison): mosaicml-streaming
(MDS, what mosaicml/diffusion uses) needs transformers<5, numpy<2.2 and torchvision, and litdata needs
torchvision; neither installs beside this project's pins. webdataset's tar streams have no exact mid-epoch
resume. The format stays plain Parquet, read with pyarrow (its own filesystems for local paths, s3:// and
gs://; fsspec for any other URL).
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from pea.embed.store import CorruptPart, as_tensor, decode_raw
from pea.train.shards import Shards


@dataclass
class Batch:
    teacher: torch.Tensor                # (B, tokens, dim), stored dtype
    teacher_pooled: torch.Tensor | None  # (B, pooled dim) for SDXL
    student: torch.Tensor                # (B, tokens, student dim)
    latents: torch.Tensor                # (B, C, h, w)
    native: torch.Tensor                 # (B,) float: 1 = native caption (diffusion loss)

    def __len__(self) -> int:
        return len(self.native)


@dataclass(frozen=True)
class _Epoch:
    windows: list[list[list[int]]]  # per partition: windows of block ids
    ends: list[list[int]]           # per partition: cumulative rows at the end of each window
    batches: int                    # global micro-batches the epoch holds


class ShardStream:
    def __init__(self, shards: Shards, micro_batch: int, seed: int, rank: int = 0, world: int = 1,
                 partitions: int | None = None, shuffle_row_groups: int = 4, prefetch: int = 1):
        partitions = partitions or world
        if partitions % world or micro_batch % (partitions // world):
            raise ValueError(f"{partitions} partitions do not split over {world} process(es) with micro-batch "
                             f"{micro_batch}; set train.data.partitions to a multiple of the world size")
        self.shards, self.seed, self.world, self.partitions = shards, seed, world, partitions
        self.window, self.prefetch = shuffle_row_groups, prefetch
        self.per_partition = micro_batch // (partitions // world)
        self.mine = range(rank * partitions // world, (rank + 1) * partitions // world)
        self.blocks = [(f, g, n) for f, groups in enumerate(shards.row_groups) for g, n in enumerate(groups)]
        self.columns = [*shards.tensors, "native"]
        self._epochs: dict[int, _Epoch] = {}
        self._starts = [0]  # global micro-step at which each epoch starts (grown lazily)
        self._windows: dict[tuple[int, int, int], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=min(8, max(1, len(self.mine) * max(prefetch, 1))),
                                        thread_name_prefix="pea-reader")
        self._fs, self._root = shards.filesystem()
        self._epoch(0)  # refuses a pack too small for this layout now, not at some later step

    # --- the plan: pure functions of (seed, epoch, partition, window) --------------------------------------------

    def _epoch(self, e: int) -> _Epoch:
        if e not in self._epochs:
            order = np.random.default_rng([self.seed, e]).permutation(len(self.blocks))
            windows, ends = [], []
            for p in range(self.partitions):
                ids = order[p::self.partitions].tolist()  # one int per row group: O(corpus / row_group_rows)
                windows.append([ids[i:i + self.window] for i in range(0, len(ids), self.window)])
                ends.append(np.cumsum([sum(self.blocks[b][2] for b in w) for w in windows[-1]]).tolist())
            batches = min((e_p[-1] if e_p else 0) for e_p in ends) // self.per_partition
            if not batches:
                raise ValueError(
                    f"{self.shards.rows} training rows in {len(self.blocks)} row groups cannot fill one global batch "
                    f"of {self.per_partition * self.partitions} from {self.partitions} partitions (epoch {e}); lower "
                    "train.micro_batch_size, train.data.partitions or train.data.row_group_rows, or acquire more pairs")
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}  # keep two epochs of plan
            self._epochs[e] = _Epoch(windows, ends, batches)
        return self._epochs[e]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, global micro-batch within it) of micro-step `step`."""
        while self._starts[-1] <= step:
            self._starts.append(self._starts[-1] + self._epoch(len(self._starts) - 1).batches)
        e = bisect.bisect_right(self._starts, step) - 1
        return e, step - self._starts[e]

    # --- reading -----------------------------------------------------------------------------------------------

    def _read_window(self, e: int, p: int, w: int, blocks: list[int]) -> dict[str, torch.Tensor]:
        # numpy only in this thread: torch ops here would start a second intra-op thread team, whose spinning
        # threads slowed the training step 1.75x on 2 cores.
        parts: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        for block in blocks:
            f, g, _ = self.blocks[block]
            path = f"{self._root}/{self.shards.files[f]}"
            try:
                with self._fs.open_input_file(path) as handle:
                    table = pq.ParquetFile(handle, page_checksum_verification=True).read_row_group(
                        g, columns=self.columns)
            except OSError as err:  # a page's checksum failed (pea.train.shards writes them), or the file is unreadable
                raise CorruptPart(f"training shard {path} is corrupt ({err}); delete the pack folder {self._root} "
                                  "(the pack stage writes it again from the stores) and rerun") from err
            for name, (shape, _) in self.shards.tensors.items():
                parts[name].append(decode_raw(table.column(name), shape))
            parts["native"].append(table.column("native").to_numpy(zero_copy_only=False).astype(np.float32))
        order = np.random.default_rng([self.seed, e, p, w]).permutation(sum(len(a) for a in parts["native"]))
        window = {name: np.concatenate(chunks)[order] for name, chunks in parts.items()}
        return {name: torch.from_numpy(window["native"]) if name == "native"
                else as_tensor(window[name], self.shards.tensors[name][1]) for name in self.columns}

    def _window_future(self, e: int, p: int, w: int) -> Future:
        with self._lock:
            key = (e, p, w)
            if key not in self._windows:
                self._windows[key] = self._pool.submit(self._read_window, e, p, w, self._epoch(e).windows[p][w])
            return self._windows[key]

    def _next_windows(self, e: int, p: int, w: int, count: int) -> list[tuple[int, int, int]]:
        out = []
        while len(out) < count:
            w += 1
            if w >= len(self._epoch(e).windows[p]):
                e, w = e + 1, 0
            out.append((e, p, w))
        return out

    def batch(self, step: int) -> Batch:
        """This rank's micro-batch of global micro-step `step`."""
        e, b = self.locate(step)
        plan = self._epoch(e)
        start, stop = b * self.per_partition, (b + 1) * self.per_partition
        pieces, needed = [], set()
        for p in self.mine:
            first = bisect.bisect_right(plan.ends[p], start)
            last = bisect.bisect_right(plan.ends[p], stop - 1)
            for w in range(first, last + 1):
                needed.add((e, p, w))
                window = self._window_future(e, p, w).result()
                offset = plan.ends[p][w - 1] if w else 0
                lo, hi = max(start, offset) - offset, min(stop, plan.ends[p][w]) - offset
                pieces.append({name: tensor[lo:hi] for name, tensor in window.items()})
            for ahead in self._next_windows(e, p, last, self.prefetch):
                needed.add(ahead)
                self._window_future(*ahead)
        with self._lock:  # drop windows no longer in use or read ahead
            for key in [k for k in self._windows if k not in needed]:
                self._windows.pop(key).cancel()
        joined = {name: torch.cat([piece[name] for piece in pieces]) for name in self.columns}
        return Batch(joined["teacher"], joined.get("teacher_pooled"), joined["student"], joined["latents"],
                     joined["native"])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._windows.clear()

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *_) -> None:
        self.close()
