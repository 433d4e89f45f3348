"""Where the culture set is lost (#19, docs/results.md): does a PEA adapter draw its culture phrases on the
native rows' own scenes (the training culture captions) and fail only on the held-out combinations, or fail both?

    .venv/bin/python benchmarks/culture_fit.py --lake /work/tables/zh/zh --language zh \
        --runs noise-0/seed-0 noise-0/seed-1 noise-0.3/seed-0 noise-0.3/seed-1 noise-0.3-native-0/seed-0

Reads the PEA adapters of a benchmarks/toy_table.py lake (`<lake>/<world>/<language>/<seed>/adapter`) and scores
with the attribute judge, `evaluate.judge_seeds` seeds each, the training culture captions (pea.corpus.culture:
the scenes the native rows show) and the held-out culture prompt set, beside the English teacher given each
scene's plain description and the word-by-word dictionary. Prints one table: all four attributes right (shape).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", type=Path, required=True, help="a benchmarks/toy_table.py lake (one language)")
    parser.add_argument("--language", default="zh")
    parser.add_argument("--runs", nargs="+", required=True, help="<world>/<seed> folders, e.g. noise-0.3/seed-0 or "
                        "noise-0.3/seed-0/paper (an ablation of that run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 beside other jobs)")
    args = parser.parse_args()

    import torch

    from pea import models
    from pea.corpus.culture import PROMPT_SET
    from pea.corpus.synthetic import ENGLISH, caption, culture_scenes
    from pea.evaluate import judge_systems, load_prompts
    from pea.method.adapter import PEAAdapter
    from pea.spec import load_spec

    torch.set_num_threads(args.threads)
    spec = load_spec(args.language, "embedded,toy", zoo_dir=args.lake / "zoo")
    adapters = {}
    for run in args.runs:
        world, seed = run.split("/", 1)  # a seed folder, or one of its ablations (seed-0/<name>)
        folder = args.lake / world / args.language / seed / "adapter"
        if not folder.is_dir():
            raise SystemExit(f"--runs {run}: no adapter at {folder}; train it with benchmarks/toy_table.py --lake")
        adapters[run] = PEAAdapter.from_pretrained(folder).eval()
    pipe, student = models.load_pipeline(spec.teacher), models.load_student(spec.student)
    training, _ = culture_scenes(spec.synthetic_captions)
    sets = {"training culture captions": [(target, caption(scene, ENGLISH)) for scene, target in training],
            "held-out culture prompts": load_prompts(args.language, PROMPT_SET)}
    judged = {name: judge_systems(spec, pipe, student, adapters, prompts) for name, prompts in sets.items()}
    print(f"\n| {args.language}: system | " + " | ".join(f"{name} ({len(sets[name])})" for name in sets) + " |")
    print("|---|" + "---:|" * len(sets))
    for system in judged[next(iter(sets))]:
        cells = [f"{j[system]['all_right']:.3f} ({j[system]['shape']:.3f})" for j in judged.values()]
        print(f"| {system} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
