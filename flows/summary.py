"""The main job's closing summary in the terminal (rich): rows per stage, the comparison tables, where the model
and the UIs are. The flow returns the summary as a dict; this only prints it."""

from __future__ import annotations

import json

from pea.corpus.culture import PROMPT_SET as CULTURE_SET
from pea.io.redact import redact


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ev, f = summary["evaluation"], summary["filtered"]
    table = Table(title=f"PEA · {summary['language']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("acquired", f"{summary['acquired']['downloaded']} of {summary['acquired']['rows']} manifest rows "
                              f"downloaded ({summary['acquired']['shards_skipped']} of {summary['acquired']['shards']}"
                              f" shards were already complete, {summary['acquired']['seconds']} s)")
    dropped = {reason: n for reason, n in f["dropped"].items() if n}  # every reason, zeros too, is in quality.json
    table.add_row("filtered", f"{f['rows_out']} of {f['rows_in']} rows kept; dropped {json.dumps(dropped)}")
    table.add_row("embedded", f"computed {json.dumps(summary['embedded']['computed'])}, reused "
                              f"{json.dumps(summary['embedded']['reused'])} ({summary['embedded']['seconds']} s)")
    if "packed" in summary:
        p = summary["packed"]
        table.add_row("packed", f"{p['train_rows']} training rows in {p['row_groups']} row groups, "
                                f"{p['heldout_rows']} held-out rows scored ({p['root']})")
    if summary.get("cached"):
        table.add_row("from cache", ", ".join(summary["cached"]) + " (finished in an earlier run; not redone)")
    table.add_row("trained", f"{summary['trained']['steps']} steps, final loss {summary['trained']['final_loss']}, "
                             f"{summary['trained']['samples_per_s']} samples/s")
    table.add_row("evaluation", f"{ev['heldout_pairs']} held-out pairs: UNet-output relative error "
                                f"{ev['rel_error_trained']:.4f} trained vs {ev['rel_error_untrained']:.4f} untrained "
                                f"({ev['improvement']:.0%} lower)")
    table.add_row("model", summary["model"]["uri"] + (f"  (alias: {summary['model']['champion']})"
                                                      if summary["model"]["champion"] else "  (not promoted)"))
    table.add_row("image grid", summary["grid"])
    table.add_row("MLflow UI", f"mlflow ui --backend-store-uri {redact(summary['model']['tracking_uri'])}")
    table.add_row("Prefect UI", "prefect server start   (then open http://127.0.0.1:4200)")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    rows = summary.get("table") or []
    if rows:
        comparison = Table(title=f"held-out comparison · {summary['language']} (docs/evaluation.md)")
        for column in rows[0]:  # short headers, and system names never cut: the table must fit 110 columns
            if column == "system":
                comparison.add_column(column, justify="left", no_wrap=True, min_width=len("diffusion_only"))
            else:
                header = column.replace(f"judge_{CULTURE_SET}", "culture").replace("judge_", "")
                comparison.add_column(header, justify="right")
        for row in rows:
            comparison.add_row(*("—" if v is None else str(v) for v in row.values()))
        console.print(comparison)
        if "judge_trained_vs_teacher" in ev:
            console.print(f"judge: PEA draws {ev['judge_trained_vs_teacher']:.0%} as many held-out prompts right "
                          f"as the English teacher (aim ≥ 90%)")
        if "judge_diffusion_only" in ev:
            console.print(f"judge: PEA − diffusion loss only = {ev['judge_trained'] - ev['judge_diffusion_only']:+.3f} "
                          f"on this corpus ({summary.get('world', 'its noise')}; aim ≥ +0.1 at 30 % mismatched pairs)")
        culture = {k.removeprefix(f"judge_{CULTURE_SET}_"): v for k, v in ev.items()
                   if k.startswith(f"judge_{CULTURE_SET}_")}
        if culture.get("teacher_en"):
            console.print(f"judge, held-out culture phrases: PEA {culture['trained']:.3f}, English teacher given the "
                          f"scene {culture['teacher_en']:.3f}, dictionary {culture.get('dictionary', float('nan')):.3f} "
                          "(aims: ≥ 0.8 × the teacher, ≥ dictionary + 0.3)")
