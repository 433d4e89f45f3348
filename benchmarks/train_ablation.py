"""Train one of toy_table.py's ablations again, with other steps, into a toy_table lake's seed-0 run (#19).

    .venv/bin/python benchmarks/train_ablation.py --lake /work/tables/zh/zh --language zh \
        --ablation attention_perturbed --steps 6000 --name attention_perturbed_6k --threads 2

The adapter lands in <lake>/noise-<noise>/<language>/seed-0/<name>/adapter, where lora_robustness.py and
style_lora.py pick up every ablation trained in that run; the lake's pairs and embeddings are reused as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", type=Path, required=True, help="a benchmarks/toy_table.py lake (one language)")
    parser.add_argument("--language", default="zh")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--ablation", required=True, help="a toy_table.py ABLATIONS name")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--name", required=True, help="the run's folder under seed-0")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from toy_table import ABLATIONS

    from pea import embed, ops, train
    from pea.corpus import filter as filter_stage
    from pea.spec import load_spec

    if args.ablation not in ABLATIONS:
        parser.error(f"--ablation {args.ablation!r} is not one of toy_table.py's: {', '.join(sorted(ABLATIONS))}")
    torch.set_num_threads(args.threads)
    world = args.lake / f"noise-{args.noise:g}"
    base = ops.with_overrides(load_spec(args.language, "embedded,toy", zoo_dir=args.lake / "zoo"),
                              corpus={"synthetic": {"mismatched": args.noise}}, train={"steps": args.steps})
    filtered = filter_stage.filter_pairs(base, world)  # reused: the lake's filter and embed outputs are complete
    embedded = embed.embed(base, world, filtered.pairs_path)
    spec = ops.with_overrides(base, train=ABLATIONS[args.ablation] | {"seed": 0})
    result = train.train(spec, filtered.pairs_path, embedded, world / args.language / "seed-0" / args.name)
    print(f"adapter {result.adapter_dir} final_loss={result.final_loss:.4f}")


if __name__ == "__main__":
    main()
