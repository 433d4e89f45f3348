"""Evaluate an adapter against the English teacher and against baselines, all in one table.

    evaluate(spec, pairs_path, embedded, adapter_dir, out_dir) -> Evaluation

Systems (rows of the table; docs/evaluation.md explains each figure):
- `teacher_en`  translate-then-English: the English reference through the teacher (the ceiling)
- `trained`     the PEA adapter under evaluation
- `untrained`   the exact initialisation training started from (same seed, same config)
- `linear_map`  the student's whole token grid through a ridge-regression map to the teacher's whole
                conditioning, fit in closed form on a bounded sample of the training split (pea.evaluate.baselines)
- `diffusion_only` (optional, `evaluate.diffusion_only_baseline`) the adapter trained with the diffusion loss
                alone, no distillation (the flow trains it beside the PEA adapter)
- `output_kd`, `no_native` (optional, benchmarks/toy_table.py) ablations: output KD only (no feature KD), and
                PEA without native captions (train.diffusion_loss: none)
- `dictionary`  (optional, `evaluate.dictionary_baseline`) the target prompt translated word by word into
                English with the synthetic lexicon, then the teacher: the paper's translation baseline in miniature

Figures (columns):
- `rel_error`   held-out parallel pairs, UNet-output space: the same latents, noise and timesteps go
                through the frozen UNet under the teacher's English conditioning and under each system's;
                Σ‖ε_system − ε_teacher‖² / Σ‖ε_teacher‖² (0 for the teacher by definition)
- `image_mse`   held-out pairs, image space: the stock pipeline at fixed seeds; pixel MSE to the teacher's image
- `clip_<set>`  CLIPScore (torchmetrics) of each system's images for the prompt set's target-language prompts,
                with the multilingual CLIP the spec names (`evaluate.clip_model`)
- `judge`       (toy world, `evaluate.judge`) share of images, over every distinct held-out prompt and
                `evaluate.judge_seeds` seeds each, whose count, colour, shape and position the attribute judge
                (pea.models.toy) reads as the prompt says; `judge_<attribute>` per attribute. Prompts that name only
                part of a scene (corpus.synthetic.partial) are left out: the judge would have to guess.
- `judge_<set>` the same on each prompt set of `evaluate.judged_sets` (e.g. synthetic-culture: held-out
                culture-specific phrases, the English side the scene's plain description)

Grids (PNG, drawn by pea.evaluate.grids): English teacher | PEA trained | untrained | [diffusion only | dictionary |] linear
map, at the same seeds, each row captioned in the target language and in English.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pea import models
from pea.embed import EmbedResult
from pea.evaluate.baselines import LinearMap, untrained_like
from pea.evaluate.grids import HEADER, write_grid
from pea.io.atomic import publish
from pea.method.adapter import PEAAdapter
from pea.method.distill import Conditioning, sdxl_time_ids
from pea.models.pipeline import draw, generate
from pea.spec import LanguageSpec, ModelRef, StudentSpec, home
from pea.spec.hub import pinned_revision
from pea.train.shards import Packed, pack
from pea.train.table import TrainingTable, load_table

SYSTEMS = ("teacher_en", "trained", "untrained", "linear_map")  # always in the table
ORDER = ("teacher_en", "trained", "paper", "output_kd", "no_native", "perturbed", "aligned", "aligned_perturbed", "untrained",
         "diffusion_only", "dictionary", "linear_map")
JUDGED = ("all_right", "count", "color", "shape", "position")


@dataclass(frozen=True)
class Evaluation:
    heldout_pairs: int
    relative_error: dict[str, float]   # {"trained", "untrained", "linear_map"} (the teacher is the reference)
    image_mse: dict[str, float]        # same keys
    grid: Path                         # held-out pairs: teacher | trained | untrained | linear map
    report: Path                       # evaluation.json: every figure, the captions, the settings
    clip_score: dict[str, dict[str, float]] = field(default_factory=dict)  # {prompt set: {system: score}}
    grids: dict[str, Path] = field(default_factory=dict)                   # {prompt set: grid PNG}
    table: Path | None = None          # evaluation.csv: one row per system
    # What the figures were computed on, so the registry can re-evaluate a champion on the same set.
    pairs_path: Path | None = None
    embedded: EmbedResult | None = None
    adapter_dir: Path | None = None
    clip_model: str | None = None
    systems: tuple[str, ...] = SYSTEMS  # the table's rows, in ORDER
    judge: dict[str, dict[str, float]] = field(default_factory=dict)  # {system: {all_right, count, ...}}
    judge_sets: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # {set: {system: {...}}}
    pack_root: Path | None = None      # the pack scored (pea.train.shards): the registry opens it, its fingerprint included

    @property
    def improvement(self) -> float:
        """How much of the untrained adapter's error training removed (0.5 = halved)."""
        return 1.0 - self.relative_error["trained"] / self.relative_error["untrained"]

    def metrics(self) -> dict[str, float]:
        out = {f"rel_error_{k}": v for k, v in self.relative_error.items()}
        out["improvement"] = self.improvement
        out |= {f"image_mse_{k}": v for k, v in self.image_mse.items()}
        for name, scores in self.clip_score.items():
            out |= {f"clip_{name}_{k}": v for k, v in scores.items()}
        out |= {f"judge_{k}": v["all_right"] for k, v in self.judge.items()}
        for name, judged in self.judge_sets.items():
            out |= {f"judge_{name}_{k}": v["all_right"] for k, v in judged.items()}
        if self.judge.get("teacher_en", {}).get("all_right"):
            out["judge_trained_vs_teacher"] = self.judge["trained"]["all_right"] / self.judge["teacher_en"]["all_right"]
        return out

    def rows(self) -> list[dict[str, object]]:
        """The table: one row per system, NaN where a figure does not apply."""
        rows = []
        for system in self.systems:
            row: dict[str, object] = {"system": system}
            if self.judge:
                row |= {("judge" if k == "all_right" else f"judge_{k}"): self.judge[system][k] for k in JUDGED}
            row |= {"rel_error": 0.0 if system == "teacher_en" else self.relative_error.get(system),
                    "image_mse": 0.0 if system == "teacher_en" else self.image_mse.get(system)}
            row |= {f"clip_{name}": scores.get(system) for name, scores in self.clip_score.items()}
            row |= {f"judge_{name}": judged[system]["all_right"] for name, judged in self.judge_sets.items()}
            rows.append(row)
        return rows


# --- UNet-output agreement ----------------------------------------------------------------------------------------

@torch.no_grad()
def relative_errors(spec: LanguageSpec, table: TrainingTable, adapters: dict[str, torch.nn.Module],
                    states: dict[str, torch.Tensor] | None = None, unet=None) -> dict[str, float]:
    """Σ‖ε_adapter − ε_teacher‖² / Σ‖ε_teacher‖² over the table, every timestep of the spec, one fixed noise draw
    (`evaluate.seed`): any two calls on the same table see the same latents, noise and timesteps. `states` gives an
    adapter student states other than the table's (an adapter trained on another student encoder); `unet` another
    UNet than the spec's teacher (e.g. with a LoRA: benchmarks/lora_robustness.py)."""
    states = states or {}
    unet = unet or models.load_unet(spec.teacher, models.inference_dtype(spec.train.precision))
    scheduler = models.load_noise_scheduler(spec.teacher)
    g = torch.Generator().manual_seed(spec.evaluate.seed)
    noise = torch.randn(table.latents.shape, generator=g)
    size = spec.corpus.image_size
    errors = {name: 0.0 for name in adapters}
    reference = 0.0
    for t in spec.evaluate.timesteps:
        for rows in torch.arange(len(table)).split(32):
            timesteps = torch.full((len(rows),), t)
            time_ids = sdxl_time_ids(size, size, len(rows)).to(unet.device) if spec.teacher.kind == "sdxl" else None
            noisy = scheduler.add_noise(table.latents[rows].float(), noise[rows], timesteps).to(unet.device, unet.dtype)
            timesteps = timesteps.to(unet.device)
            pooled = None if table.teacher_pooled is None else table.teacher_pooled[rows].to(unet.device)
            teacher = Conditioning(table.teacher[rows].to(unet.device), pooled, time_ids)
            eps_teacher = unet(noisy, timesteps, **teacher.unet_kwargs(unet.dtype)).sample.float()
            reference += eps_teacher.pow(2).sum().item()
            for name, adapter in adapters.items():
                rows_states = states.get(name, table.student)[rows].float().to(adapter.device)
                student = Conditioning(*adapter(rows_states), time_ids)
                eps = unet(noisy, timesteps, **student.unet_kwargs(unet.dtype)).sample.float()
                errors[name] += (eps - eps_teacher).pow(2).sum().item()
    return {name: err / reference for name, err in errors.items()}


# --- prompt sets and CLIPScore ------------------------------------------------------------------------------------

def load_prompts(language: str, name: str, limit: int | None = None) -> list[tuple[str, str]]:
    """`data/prompts/<language>/<name>.txt`: `target<TAB>english` per line; blank lines and # comments skipped."""
    path = home() / "data" / "prompts" / language / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt set {path} does not exist; write it (one `target<TAB>english` line per "
                                f"prompt, docs/evaluation.md) or remove {name!r} from evaluate.prompt_sets")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{path}:{number}: expected `target<TAB>english` (two non-empty fields separated by "
                             f"one tab), got {line!r}")
        prompts.append((parts[0].strip(), parts[1].strip()))
    if not prompts:
        raise ValueError(f"prompt set {path} has no prompts")
    return prompts[:limit]


class _Features(torch.nn.Module):
    """A CLIP-style model as torchmetrics' CLIPScore calls it: `get_*_features` return the projected embedding
    tensor (transformers 5 returns a model output whose pooler_output holds it)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


@functools.lru_cache(maxsize=2)
def _clip(model_id: str, revision: str | None):
    from transformers import AutoModel, AutoProcessor

    try:
        model = AutoModel.from_pretrained(model_id, revision=revision, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(model_id, revision=revision)
    except OSError as err:
        raise OSError(f"cannot load the CLIP model {model_id!r} (evaluate.clip_model) for CLIPScore: {err}; download "
                      "it into the Hugging Face cache, or name a local directory in the spec") from err
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise ValueError(f"evaluate.clip_model {model_id!r} is a {type(model).__name__}, not a CLIP-style dual "
                         "encoder with get_image_features/get_text_features; name a (multilingual) CLIP model")
    return _Features(model.eval()), processor


@torch.no_grad()
def clip_scores(ref: ModelRef, images: list[Image.Image], texts: list[str]) -> float:
    """Mean CLIPScore (torchmetrics: 100 · max(cos(image, text), 0)) of images against their captions."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    # Pinned like every model load (pea.spec.hub): the commit it names, and an unreachable Hub treated as offline.
    model, processor = _clip(ref.id, pinned_revision(ref.id, ref.revision) or ref.revision)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    pixels = [torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1) for image in images]
    metric.update(pixels, list(texts))
    return float(metric.compute())


def _write_atomic(path: Path, text: str) -> None:
    with publish(path, "evaluate: report") as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- the harness --------------------------------------------------------------------------------------------------

def _headers(systems: tuple[str, ...]) -> list[str]:
    """Grid column titles; a benchmark's own variant is titled by its name."""
    return [HEADER.get(s, s.replace("_", " ")) for s in systems]


def _mse(a: list[Image.Image], b: list[Image.Image]) -> float:
    return float(np.mean([np.mean((np.asarray(x, np.float32) - np.asarray(y, np.float32)) ** 2 / 255**2)
                          for x, y in zip(a, b)]))


def _draw(spec: LanguageSpec, pipe, student, adapters: dict[str, torch.nn.Module], prompts: list[tuple[str, str]],
          seeds: list[int], chunk: int = 64, extra: dict | None = None) -> dict[str, list[Image.Image]]:
    """Every system's image for each (target, english) prompt at its seed, in chunks of `chunk` prompts; `extra`:
    more arguments of the pipeline call, the same for every system (e.g. a ControlNet pipeline's `image`)."""
    cfg, size = spec.evaluate, spec.corpus.image_size
    call = {"num_inference_steps": cfg.inference_steps, "guidance_scale": cfg.guidance_scale, "height": size,
            "width": size, **(extra or {})}
    english = {"teacher_en": [e for _, e in prompts]}
    if cfg.dictionary_baseline:  # a baseline of the synthetic world only: its lexicon is that world's
        from pea.corpus.synthetic import word_by_word

        english["dictionary"] = [word_by_word(t, spec.synthetic_captions) for t, _ in prompts]
    target = [t for t, _ in prompts]
    images: dict[str, list[Image.Image]] = {name: [] for name in [*english, *adapters]}
    with torch.no_grad():
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            for name, texts in english.items():
                # No negative prompt: the stock rule for an empty one (SDXL may use zeros), as generate() follows.
                images[name] += draw(pipe, prompt=texts[part], negative_prompt=None,
                                     generator=[torch.Generator().manual_seed(s) for s in seeds[part]], **call)
            for name, adapter in adapters.items():
                images[name] += generate(pipe, adapter, student, target[part], seeds[part], **call)
    return images


def judge_systems(spec: LanguageSpec, pipe, student, adapters: dict[str, torch.nn.Module],
                  prompts: list[tuple[str, str]], expected=None, extra: dict | None = None) -> dict[str, dict[str, float]]:
    """The attribute judge over every distinct (target, English) prompt that names a whole scene,
    `evaluate.judge_seeds` seeds each. `expected(scene) -> scene`: what an image should show instead of the
    prompt's own scene (a style LoRA that recolours, benchmarks/style_lora.py; a ControlNet that moves the shape,
    benchmarks/controlnet.py); default the scene itself. `extra`: more pipeline arguments (a control image)."""
    from pea.models.toy import Judge, is_scene, judge_score, scene_of, to_tensor

    judge = Judge.load(Path(spec.evaluate.judge))
    prompts = sorted({p for p in prompts if is_scene(p[1])})
    if not prompts:
        raise ValueError("no prompt names a whole scene of the synthetic world: nothing for the judge to score")
    prompts = [p for p in prompts for _ in range(spec.evaluate.judge_seeds)]
    seeds = [spec.evaluate.seed + 1000 + i for i in range(len(prompts))]  # not the grid's seeds
    drawn = _draw(spec, pipe, student, adapters, prompts, seeds, extra=extra)
    scenes = [(expected or (lambda scene: scene))(scene_of(e)) for _, e in prompts]
    return {name: judge_score(judge, to_tensor(images), scenes).as_dict() for name, images in drawn.items()}


def evaluate(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, adapter_dir: Path,
             out_dir: Path, baselines: dict[str, Path] | None = None, packed: Packed | None = None) -> Evaluation:
    """Every system of the table on the held-out pairs and the prompt sets; writes evaluation.json, evaluation.csv
    and the grids into `out_dir`. `baselines` adds other trained adapters as rows ({"diffusion_only": dir}).
    `packed`: the pack training read (opened, never made again); without it, pea.train.shards.pack finds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = spec.evaluate
    packed = packed or pack(spec, pairs_path, embedded)  # the pairs' fingerprint: scanned at most once a process
    heldout = load_table(spec, pairs_path, embedded, "heldout", packed=packed).with_english()
    trained = PEAAdapter.from_pretrained(adapter_dir).eval()
    linear = LinearMap.fit(packed.train, cfg.linear_map_rows, cfg.seed)
    adapters = {"trained": trained, "untrained": untrained_like(trained, spec.train.seed), "linear_map": linear}
    for name, folder in (baselines or {}).items():
        if name in SYSTEMS or not name.isidentifier():  # other names (a benchmark's variants) come after ORDER's
            raise ValueError(f"baseline {name!r} must be a plain name other than {list(SYSTEMS)}, e.g. one of "
                             f"{[s for s in ORDER if s not in SYSTEMS]}")
        adapters[name] = PEAAdapter.from_pretrained(folder).eval()
    adapters = {name: adapter.to(models.device()) for name, adapter in adapters.items()}
    optional = [s for s in ORDER if s in adapters or (s == "dictionary" and cfg.dictionary_baseline)]
    systems = tuple(s for s in ORDER if s in SYSTEMS or s in optional) + tuple(s for s in adapters if s not in ORDER)
    relative = relative_errors(spec, heldout, adapters)

    pipe = models.load_pipeline(spec.teacher, dtype=models.inference_dtype(spec.train.precision))
    student = models.load_student(spec.student)
    n = min(cfg.grid_prompts, len(heldout))
    seeds = [cfg.seed + i for i in range(n)]
    pairs = list(zip(heldout.captions[:n], heldout.captions_en[:n]))
    images = _draw(spec, pipe, student, adapters, pairs, seeds)
    image_mse = {name: _mse(images[name], images["teacher_en"]) for name in images if name != "teacher_en"}
    grid, missing = write_grid([[images[s][i] for s in systems] for i in range(n)], pairs,
                               _headers(systems), out_dir / "grid.png")
    judged = judge_systems(spec, pipe, student, adapters, list(zip(heldout.captions, heldout.captions_en))) \
        if cfg.judge else {}
    judged_sets = {name: judge_systems(spec, pipe, student, adapters, load_prompts(spec.language, name))
                   for name in cfg.judged_sets}

    clip_ref = ModelRef(id=cfg.clip_model, revision=cfg.clip_revision)
    clip, grids, prompt_sets = {}, {}, {}
    for name in cfg.prompt_sets:
        prompts = load_prompts(spec.language, name, cfg.prompts_per_set)
        seeds = [cfg.seed + i for i in range(len(prompts))]
        drawn = _draw(spec, pipe, student, adapters, prompts, seeds)
        targets = [t for t, _ in prompts]
        clip[name] = {system: clip_scores(clip_ref, drawn[system], targets) for system in systems}
        k = min(cfg.grid_prompts, len(prompts))
        grids[name], more = write_grid([[drawn[s][i] for s in systems] for i in range(k)], prompts[:k],
                                       _headers(systems), out_dir / f"grid-{name}.png")
        missing += more
        prompt_sets[name] = prompts

    evaluation = Evaluation(len(heldout), relative, image_mse, grid, out_dir / "evaluation.json", clip, grids,
                            out_dir / "evaluation.csv", Path(pairs_path), embedded, Path(adapter_dir), cfg.clip_model,
                            systems, judged, judged_sets, packed.root)
    rows = evaluation.rows()
    with publish(evaluation.table, "evaluate: table") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = {"language": spec.language, "heldout_pairs": len(heldout), **evaluation.metrics(), "table": rows,
              "settings": cfg.model_dump(mode="json"), "teacher": spec.teacher.id, "student": spec.student.id,
              "grid": str(grid), "grids": {k: str(v) for k, v in grids.items()},
              "grid_captions": [{"en": e, spec.language: t} for t, e in pairs],
              "prompt_sets": {k: [{"en": e, spec.language: t} for t, e in v] for k, v in prompt_sets.items()},
              "judge": judged, "judge_sets": judged_sets, "captions_without_font": sorted(set(missing))}
    _write_atomic(evaluation.report, json.dumps(report, ensure_ascii=False, indent=2))
    return evaluation


def format_table(evaluation: Evaluation) -> str:
    """The table as aligned text (what `pea eval` prints)."""
    rows = evaluation.rows()
    columns = list(rows[0])
    cells = [[str(r["system"])] + [("—" if r[c] is None else f"{r[c]:.4f}") for c in columns[1:]] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def student_ref(tags: dict[str, str], spec: LanguageSpec) -> StudentSpec:
    """The student encoder a registered version was trained with (from its lineage tags)."""
    none = lambda v: None if v in (None, "None") else v  # noqa: E731 — tags store None as text
    return spec.student.model_copy(update={"id": tags.get("student_id", spec.student.id),
                                           "revision": none(tags.get("student_revision", spec.student.revision))})
