"""Ablations of the PEA objective and a sweep of the adapter's width, in the proxy world.

Tiny models and the synthetic parallel corpus (embedded profile), one acquire/filter/embed, then every
variant trains the same number of steps from the same initialisation and is evaluated on the same
held-out prompts with the same noise, timesteps and seeds (pea.evaluate):
  gap closed       = 1 − err / err_untrained   (UNet-output relative error vs the English teacher)
  image gap closed = 1 − mse / mse_untrained   (pixel MSE to the teacher's image at fixed seeds)

    python benchmarks/ablation.py [--steps 200] [--out docs/figures]

Prints one table per part; the last line is `gap_closed_full=<fraction>`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", WANDB_MODE="disabled",
                  NO_ALBUMENTATIONS_UPDATE="1", TRANSFORMERS_VERBOSITY="error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language", default="zh")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--widths", default="8,16,32,64,128,256,512")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()

    from pea import embed, evaluate, train
    from pea.corpus import acquire, filter
    from pea.method.adapter import PEAAdapter
    from pea.models.embedded import prepare_zoo
    from pea.spec import load_spec

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pea-ablation-"))
    zoo = work / "zoo"
    prepare_zoo(zoo, image_size=32)
    base = load_spec(args.language, "embedded", zoo_dir=zoo)
    base = base.model_copy(update={"train": base.train.model_copy(update={"steps": args.steps,
                                                                           "checkpoint_every": args.steps})})
    acquire.acquire(base, work)
    pairs = filter.filter_pairs(base, work).pairs_path
    stores = embed.embed(base, work, pairs)

    def run(name: str, **train_update) -> evaluate.Evaluation:
        spec = base.model_copy(update={"train": base.train.model_copy(update=train_update)})
        trained = train.train(spec, pairs, stores, work / "runs" / name)
        return evaluate.evaluate(spec, pairs, stores, trained.adapter_dir, work / "runs" / name / "eval")

    def gaps(e: evaluate.Evaluation) -> tuple[float, float]:
        return e.improvement, 1 - e.image_mse["trained"] / e.image_mse["untrained"]

    objectives = {
        "diffusion loss only": dict(diffusion_loss="all"),
        "output KD only": dict(output_kd_weight=1.0, feature_kd_weight=0.0),
        "feature KD only": dict(output_kd_weight=0.0, feature_kd_weight=0.1),
        "output + feature KD (PEA)": dict(output_kd_weight=1.0, feature_kd_weight=0.1),
    }
    rows = {"untrained adapter": (0.0, 0.0)}
    results = {name: run(name.split()[0] + "-" + str(i), **update) for i, (name, update) in
               enumerate(objectives.items())}
    rows |= {name: gaps(e) for name, e in results.items()}
    print(f"\nObjective ablation: {args.steps} steps each, hidden_dim {base.train.hidden_dim}, "
          f"{results['output + feature KD (PEA)'].heldout_pairs} held-out pairs")
    print(f"{'objective':28} {'gap closed':>11} {'image gap closed':>17}")
    for name, (unet_gap, image_gap) in sorted(rows.items(), key=lambda kv: kv[1][0]):
        print(f"{name:28} {unet_gap:11.3f} {image_gap:17.3f}")

    widths = [int(w) for w in args.widths.split(",")]
    sweep = []
    for width in widths:
        e = results["output + feature KD (PEA)"] if width == base.train.hidden_dim else \
            run(f"width-{width}", hidden_dim=width)
        params = sum(p.numel() for p in PEAAdapter(kind="sd15", student_dim=64, hidden_dim=width,
                                                   token_dim=32).parameters())
        sweep.append((width, params, *gaps(e)))
    print("\nAdapter width sweep (student 64 → tokens 32; the paper's 1024/2048 scaled by 1/16)")
    print(f"{'hidden_dim':>10} {'parameters':>11} {'gap closed':>11} {'image gap closed':>17}")
    for width, params, unet_gap, image_gap in sweep:
        print(f"{width:10d} {params:11,d} {unet_gap:11.3f} {image_gap:17.3f}")
    plot = _plot(sweep, args.out / "adapter_width.png")
    print(f"\nplot: {plot}   total {time.perf_counter() - started:.0f} s")
    print(f"gap_closed_full={rows['output + feature KD (PEA)'][0]:.4f}")


def _plot(sweep: list[tuple], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "o-", label="UNet-output gap closed")
    ax.plot([s[1] for s in sweep], [s[3] for s in sweep], "s--", label="image gap closed")
    for width, params, gap, _ in sweep:
        ax.annotate(f"h={width}", (params, gap), textcoords="offset points", xytext=(0, 6), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("fraction of the untrained gap closed")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    main()
