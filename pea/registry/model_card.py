"""The registry's model card: the Markdown descriptions of `pea-adapter-<lang>` and of each of its versions.

    model_card(spec, evaluation, pairs_path, packed, name=, version=, run_id=, tags=, promotion=, example=)
        -> (registered model description, version description)

A version's card says what it is and how to use it: language, teacher and student at their commits, the data
(fingerprint, pairs), the evaluation table with its baselines and where the grids are, the promotion decision, the
generation settings the version records (pea.registry.record) and how to load it (pyfunc + a diffusers pipeline, `pea
generate`, `mlflow models serve`). Plain Markdown, as MLflow's UI renders it; at most MAX_CHARS (MLflow's
description column is VARCHAR(5000) on MySQL and PostgreSQL).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pea.evaluate import Evaluation
from pea.registry.record import model_config
from pea.spec import LanguageSpec
from pea.train.shards import Packed

MAX_CHARS = 5000
SYSTEMS = {"teacher_en": "the English caption through the teacher (the ceiling)", "trained": "**this adapter**",
           "untrained": "the adapter's initialisation, untrained", "linear_map": "a ridge map of the student's "
           "states to the teacher's conditioning", "diffusion_only": "the same adapter trained with the diffusion "
           "loss alone", "dictionary": "the prompt translated word by word into English, then the teacher",
           "paper": "the paper's adapter"}
COLUMNS = {"rel_error": "held-out UNet-output error relative to the teacher (lower is better)",
           "image_mse": "pixel MSE to the teacher's image at the same seed", "clip_": "CLIPScore on a prompt set",
           "judge": "share of images whose count, colour, shape and position the attribute judge reads right"}


@dataclass(frozen=True)
class _Facts:
    """What the card says, gathered at registration."""
    name: str
    version: str
    language: str
    language_name: str
    run_id: str
    tags: dict[str, str]              # the version's lineage tags (teacher_id, ..., data_fingerprint, code_version)
    record: dict[str, Any]            # the pyfunc's model_config (pea.registry.record)
    rows: list[dict[str, Any]]        # the evaluation table (Evaluation.rows())
    heldout_pairs: int
    grids: dict[str, str]             # artifact path on the run -> what it shows
    promotion: dict[str, str]         # the version's promotion.* tags
    example: str                      # a prompt in the language
    pairs: int | None = None          # rows of the filtered pairs table
    split: dict[str, int] = field(default_factory=dict)  # {"train": rows, "heldout": rows} of the pack


def _at(model_id: str, revision: str | None) -> str:
    return f"`{model_id}`" + (f" at `{revision}`" if revision not in (None, "None") else " (a local folder)")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict[str, Any]], compact: bool) -> str:
    columns = [c for c in rows[0] if not (compact and c.startswith("judge_") and c[6:] in
                                          ("count", "color", "shape", "position"))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"**{row['system']}**" if row["system"] == "trained" else str(row["system"])]
        lines.append("| " + " | ".join(cells + [_cell(row[c]) for c in columns[1:]]) + " |")
    return "\n".join(lines)


def _legend(rows: list[dict[str, Any]]) -> str:
    systems = "; ".join(f"`{r['system']}`: {SYSTEMS[r['system']]}" for r in rows if r["system"] in SYSTEMS)
    columns = "; ".join(f"`{k}{'<set>' if k.endswith('_') else ''}`: {v}" for k, v in COLUMNS.items()
                        if any(c.startswith(k) for c in rows[0]))
    return f"Systems: {systems}. Columns: {columns}."


def _usage(f: _Facts, uri: str) -> str:
    r = f.record
    sdxl = r.get("teacher_kind") == "sdxl"
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    revision = r.get("teacher_revision")
    load = f'"{r.get("teacher_id")}"' + (f', revision="{revision}"' if revision not in (None, "None") else "")
    load += "" if sdxl else ", safety_checker=None, requires_safety_checker=False"
    size = r.get("image_size")
    call = (f'num_inference_steps={r.get("num_inference_steps")}, guidance_scale={r.get("guidance_scale")}, '
            f"height={size}, width={size}")
    example = json.dumps(f.example, ensure_ascii=False)
    if sdxl:  # an empty negative prompt: the stock SDXL rule (zeros), as pea.models.pipeline follows
        predict = f"cond = adapter.predict([{example}])"
        kwargs = "kwargs = {k: torch.from_numpy(v) for k, v in cond.items()}"
    else:  # the negative prompt "" through the adapter too, as caption dropout trained it
        predict = f'cond = adapter.predict([{example}, ""])["prompt_embeds"]'
        kwargs = ("kwargs = {\"prompt_embeds\": torch.from_numpy(cond[:1]), "
                  "\"negative_prompt_embeds\": torch.from_numpy(cond[1:])}")
    if r.get("teacher_pixel_space"):  # the toy teacher denoises pixels: its VAE is never run
        draw = (f"pixels = pipe(**kwargs, {call}, output_type=\"latent\").images\n"
                "image = pipe.image_processor.postprocess(pixels, output_type=\"pil\")[0]")
    else:
        draw = f"image = pipe(**kwargs, {call}).images[0]"
    return (f"```python\nimport mlflow, torch\nfrom diffusers import {pipeline}\n\n"
            f'adapter = mlflow.pyfunc.load_model("{uri}")\n{predict}\n{kwargs}\n'
            f"pipe = {pipeline}.from_pretrained({load})\n{draw}\n```\n\n"
            f"```sh\npea generate --model-uri {uri} --prompt {shlex.quote(f.example)} --out a.png\n"
            f"mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001\n"
            "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "
            f"{shlex.quote(json.dumps({'inputs': [f.example]}, ensure_ascii=False))}\n```")


def _models(f: _Facts) -> str:
    r, t = f.record, f.tags
    teacher = (f"{_at(t.get('teacher_id', r.get('teacher_id')), t.get('teacher_revision'))} ({r.get('teacher_kind')}"
               f"{', pixel space' if r.get('teacher_pixel_space') else ''}), frozen")
    student = (f"{_at(t.get('student_id', r.get('student_id')), t.get('student_revision'))}, "
               f"max_length {r.get('student_max_length')}")
    size = f"{f.pairs} filtered pairs" if f.pairs is not None else "corpus size not readable at registration"
    if f.split:
        size += f" ({f.split.get('train')} train, {f.split.get('heldout')} held out)"
    return (f"| | |\n|---|---|\n| Language | {f.language_name} (`{f.language}`) |\n| Teacher | {teacher} |\n"
            f"| Student | {student} |\n| Data | fingerprint `{t.get('data_fingerprint')}`, {size} |\n"
            f"| Run | `{f.run_id}` (code `{t.get('code_version')}`) |")


def _promotion(f: _Facts) -> str:
    p = f.promotion
    figures = ", ".join(f"{k} {p[f'promotion.{k}']}" for k in ("challenger", "champion", "untrained")
                        if f"promotion.{k}" in p)
    return (f"**{p.get('promotion.decision', 'undecided')}**: {p.get('promotion.reason', '')}. Metric "
            f"`{p.get('promotion.metric')}` ({p.get('promotion.rule', '')}); {figures or 'no figures'}.")


def _settings(f: _Facts) -> str:
    keys = ("teacher_kind", "teacher_pixel_space", "scheduler", "guidance_scale", "num_inference_steps",
            "image_size", "precision", "student_max_length", "student_variant")
    return ("Recorded in the pyfunc's `model_config` (MLmodel; `pea generate`/`pea eval` read it, whatever "
            "`--profile` says): " + ", ".join(f"`{k}` {f.record.get(k)}" for k in keys) + ".")


def _version(f: _Facts, compact: bool) -> str:
    uri = f"models:/{f.name}/{f.version}"
    grids = "; ".join(f"`{path}` ({what})" for path, what in f.grids.items()) or "none"
    pooled = ", `pooled_prompt_embeds`" if f.record.get("teacher_kind") == "sdxl" else ""
    parts = [f"# {f.name} v{f.version}: PEA adapter for {f.language_name}",
             f"Maps `{f.language}` prompts to the conditioning of the frozen teacher (`prompt_embeds`{pooled}).",
             _models(f), f"## Evaluation ({f.heldout_pairs} held-out pairs)", _table(f.rows, compact)]
    if not compact:
        parts.append(_legend(f.rows))
    parts += [(f"Grids (English teacher | this adapter | baselines, same seeds), artifacts of run `{f.run_id}`: "
               f'{grids}; `mlflow.artifacts.download_artifacts("runs:/{f.run_id}/evaluation/grid.png")`.'),
              "## Promotion", _promotion(f), "## Generation settings", _settings(f), "## Usage", _usage(f, uri)]
    return "\n\n".join(parts)


def _model(f: _Facts) -> str:
    uri = f"models:/{f.name}@champion"
    what = (f"Lets the frozen English text-to-image teacher `{f.record.get('teacher_id')}` read `{f.language}` "
            f"prompts through the student encoder `{f.record.get('student_id')}` (PEA-Diffusion, arXiv 2311.17086); "
            "the UNet is untouched, so LoRAs and ControlNets made for the teacher still plug in. The pyfunc maps a "
            "list of prompts to the pipeline's conditioning tensors.")
    aliases = (f"Aliases: `champion`, the version to use (version {f.version} when this was written), and "
               "`challenger`, the latest registered version. A version takes `champion` only when it does not regress "
               "on the promotion metric against the current one (its card says why, in `promotion.*` tags too). Each "
               "version's description is its card: models at their commits, data, evaluation against the baselines, "
               "generation settings.")
    usage = _usage(f, uri).replace(f" --model-uri {uri}", f" --language {f.language}")
    return "\n\n".join([f"# {f.name}: PEA adapter for {f.language_name}", what, aliases, "## Usage", usage])


def model_card(spec: LanguageSpec, evaluation: Evaluation, pairs_path: Path, packed: Packed | None, *, name: str,
               version: str, run_id: str, tags: dict[str, str], promotion: dict[str, str],
               example: str) -> tuple[str, str]:
    """(the registered model's description, the version's description), each at most MAX_CHARS. `tags`: the
    version's lineage tags; `packed`: the pack evaluation scored (the split's sizes), None where it is gone."""
    import pyarrow.parquet as pq

    grids = {f"evaluation/{evaluation.grid.name}": "held-out pairs"} if evaluation.grid else {}
    grids |= {f"evaluation/{path.name}": f"prompt set {key}" for key, path in evaluation.grids.items()}
    try:
        pairs: int | None = pq.ParquetFile(pairs_path).metadata.num_rows  # the footer only
    except (OSError, ValueError):
        pairs = None
    split = {"train": packed.train.rows, "heldout": packed.heldout.rows} if packed is not None else {}
    facts = _Facts(name, version, spec.language, spec.name, run_id, tags, model_config(spec), evaluation.rows(),
                   evaluation.heldout_pairs, grids, promotion, example, pairs, split)
    text = _version(facts, compact=False)
    if len(text) > MAX_CHARS:  # the legend and the judge's per-attribute columns go first
        text = _version(facts, compact=True)
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS - 80] + "\n\n… (cut: the whole table is `evaluation/table.json` on the run)"
    return _model(facts)[:MAX_CHARS], text
