"""Train one of toy_table.py's ablations again, with other steps, into a toy_table lake's seed-0 run (#19).

    .venv/bin/python benchmarks/train_ablation.py --lake /work/tables/zh/zh --language zh \
        --ablation attention_perturbed --steps 6000 --name attention_perturbed_6k --threads 2
    .venv/bin/python benchmarks/train_ablation.py ... --ablation attention_perturbed --train token_kd_weight=10 \
        --steps 6000 --name attention_perturbed_x10_6k

`--evaluate` then judges it beside the run's PEA adapter (the rows of pea.evaluate's table, into <name>/evaluation).
The adapter lands in <lake>/noise-<noise>/<language>/seed-0/<name>/adapter, where lora_robustness.py and
style_lora.py pick up every ablation trained in that run; the lake's pairs and embeddings are reused as they are.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--evaluate", action="store_true",
                        help="then judge it beside the run's PEA adapter (pea.evaluate: held-out and culture sets)")
    parser.add_argument("--train", nargs="*", default=[], metavar="FIELD=JSON",
                        help="train-section fields over the ablation's, e.g. token_kd_weight=10")
    args = parser.parse_args()

    import torch
    from lora_robustness import load_world
    from toy_table import ABLATIONS

    from pea import evaluate, ops, train

    if args.ablation not in ABLATIONS:
        parser.error(f"--ablation {args.ablation!r} is not one of toy_table.py's: {', '.join(sorted(ABLATIONS))}")
    try:
        extra = {field: json.loads(value) for field, value in (item.split("=", 1) for item in args.train)}
    except ValueError as error:
        parser.error(f"--train takes FIELD=JSON pairs (e.g. token_kd_weight=10): {error}")
    torch.set_num_threads(args.threads)
    base, pairs_path, embedded, run = load_world(args.lake, args.language, args.noise)
    # The spec validates the merged section, so a misspelt field or a bad value is refused by name there.
    spec = ops.with_overrides(base, train=ABLATIONS[args.ablation] | extra | {"seed": 0, "steps": args.steps})
    result = train.train(spec, pairs_path, embedded, run / args.name)
    print(f"adapter {result.adapter_dir} final_loss={result.final_loss:.4f}")
    if args.evaluate:  # the name becomes the table's row, so it must be a plain identifier (pea.evaluate says so)
        judged = evaluate.evaluate(spec, pairs_path, embedded, run / "adapter", run / args.name / "evaluation",
                                   {args.name: result.adapter_dir})
        print(evaluate.format_table(judged))


if __name__ == "__main__":
    main()
