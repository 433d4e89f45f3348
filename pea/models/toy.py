"""The toy world's trained English teacher and its attribute judge: pictures that mean something on a CPU.

    .venv/bin/python -m pea.models.toy                 # ~32 min at --threads 1; rewrites data/toy/{teacher,judge}
    .venv/bin/python -m pea.models.toy --check         # score the shipped teacher with the shipped judge (~30 s)

The embedded default's random tiny teacher draws noise. This one is trained, by the code below, on the
synthetic English corpus (pea.corpus.synthetic: count × colour × shape × position on a plain background),
so it draws what an English caption names, and a PEA adapter can be judged by whether its pictures do too.

- **Teacher** (`data/toy/teacher/`, a stock `StableDiffusionPipeline` directory): a frozen, randomly
  initialised 2-layer CLIP text encoder (width 64) with a BPE tokenizer trained on the English captions,
  and a pixel-space UNet (16/32/64 channels, cross-attention at 8×8 and in the mid block, ~1 M parameters)
  trained with v-prediction on a cosine schedule. Pixels, not latents: a tiny VAE loses colour at 32×32
  (../shared/TOY-WORLD.md). The pipeline's VAE is a one-level placeholder whose only role is
  `vae_scale_factor == 1`, so the stock pipeline denoises 3×32×32 pixels; it is never run:
  `pea.models.pipeline.draw` asks for `output_type="latent"` and only denormalizes (spec `teacher.pixel_space`).
  The scheduler is DDIM with trailing spacing and no sample clipping (the stock SD pipeline turns clipping
  off anyway; with v-prediction the teacher does not need it).
- **Judge** (`data/toy/judge/`): a small CNN with one head per attribute, trained on rendered images with
  noise, tint and blur augmentation (generated pictures are never as clean as rendered ones). An image
  matches its prompt when every attribute the judge reads equals the prompt's.

Both are shipped (fp16 safetensors, well under 5 MB) so the README's main job only loads them; this command
reproduces them (seeded; the tokenizer trainer is not bit-reproducible across machines, so a rebuild gives
an equally good, not an identical, teacher). `data/toy/toy.json` records the settings, the time taken and
the accuracies measured right after training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from pea.corpus.synthetic import (
    COUNTS,
    ENGLISH,
    REGIONS,
    RGB,
    Scene,
    all_scenes,
    caption,
    render,
)
from pea.io.progress import bar as progress_bar
from pea.spec import home

IMAGE_SIZE = 32
# Attribute vocabularies in a fixed order: the judge's class indices.
ATTRIBUTES = {"count": list(COUNTS), "color": list(RGB), "shape": list(ENGLISH.shapes), "position": list(REGIONS)}


def toy_dir() -> Path:
    return home() / "data" / "toy"


def scene_of(english_caption: str) -> Scene:
    """The scene an English synthetic caption names (the inverse of `caption(scene, ENGLISH)`)."""
    scene = _SCENES.get(english_caption.strip())
    if scene is None:
        raise ValueError(f"{english_caption!r} is not a caption of the synthetic world (e.g. "
                         f"{caption(all_scenes()[0], ENGLISH)!r}); the judge reads only those")
    return scene


def is_scene(english_caption: str) -> bool:
    """Whether the caption names a whole scene (a partial caption leaves something for the judge to guess)."""
    return english_caption.strip() in _SCENES


_SCENES = {caption(s, ENGLISH): s for s in all_scenes()}


def labels(scenes: list[Scene]) -> torch.Tensor:
    """(N, 4) class indices, columns in ATTRIBUTES order."""
    return torch.tensor([[ATTRIBUTES[a].index(getattr(s, a)) for a in ATTRIBUTES] for s in scenes])


def render_batch(scenes: list[Scene], seeds: list[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Rendered scenes as a float tensor in [-1, 1], (N, 3, size, size)."""
    return to_tensor(render(s, size, seed) for s, seed in zip(scenes, seeds))


def to_tensor(images) -> torch.Tensor:
    """PIL images as a float tensor in [-1, 1]."""
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0


# --- the judge ----------------------------------------------------------------------------------------------------

class Judge(torch.nn.Module):
    """Four classifiers (count, colour, shape, position) over one small convolutional trunk."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.config = {"width": width, "image_size": IMAGE_SIZE, "attributes": ATTRIBUTES}
        conv = lambda i, o, s: [torch.nn.Conv2d(i, o, 3, s, 1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]  # noqa: E731
        self.trunk = torch.nn.Sequential(*conv(3, width, 1), *conv(width, width, 2), *conv(width, width, 2),
                                         *conv(width, width, 1), torch.nn.Flatten())
        features = width * (IMAGE_SIZE // 4) ** 2  # flattened, not pooled: position is spatial
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(features, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def read(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 4) predicted class indices."""
        self.eval()
        out = [self(chunk) for chunk in x.split(256)]
        return torch.stack([torch.cat([o[a] for o in out]).argmax(-1) for a in ATTRIBUTES], dim=1)

    @classmethod
    def load(cls, folder: Path | None = None) -> Judge:
        folder = Path(folder or toy_dir() / "judge")
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"no judge in {folder}; build it with `python -m pea.models.toy` (docs/results.md)")
        config = json.loads((folder / "config.json").read_text())
        if config["attributes"] != ATTRIBUTES:
            raise ValueError(f"the judge in {folder} reads {config['attributes']}, but the synthetic world has "
                             f"{ATTRIBUTES}; rebuild it with `python -m pea.models.toy`")
        judge = cls(config["width"])
        judge.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        return judge.eval()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in self.state_dict().items()},
                  folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise, a colour tint and sometimes a blur: what separates a generated picture from a rendered one."""
    n = len(x)
    scale = 1 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.3
    shift = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.2
    x = x * scale + shift
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.15
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1.2, 1.2)


@dataclass(frozen=True)
class JudgeScore:
    """Share of images whose attribute the judge reads as the prompt's, per attribute, and all four at once."""

    per_attribute: dict[str, float]
    all_right: float
    images: int

    def as_dict(self) -> dict:
        return {"all_right": self.all_right, **self.per_attribute, "images": self.images}


def judge_score(judge: Judge, images: torch.Tensor, scenes: list[Scene]) -> JudgeScore:
    right = judge.read(images) == labels(scenes)
    return JudgeScore({a: float(right[:, i].float().mean()) for i, a in enumerate(ATTRIBUTES)},
                      float(right.all(dim=1).float().mean()), len(scenes))


def train_judge(steps: int = 1500, batch: int = 64, seed: int = 0) -> tuple[Judge, JudgeScore]:
    """Train on freshly rendered scenes; returns the judge and its accuracy on 1,800 held-out renders
    (seeds never drawn in training, every scene ten times)."""
    torch.manual_seed(seed)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, 50, steps)
    for _ in progress_bar(range(steps), desc="train judge", unit="step"):
        drawn = rng.choices(scenes, k=batch)
        x = augment(render_batch(drawn, [rng.getrandbits(31) for _ in drawn]), g)
        y = labels(drawn)
        out = judge.train()(x)
        loss = sum(F.cross_entropy(out[a], y[:, i]) for i, a in enumerate(ATTRIBUTES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    heldout = scenes * 10
    x = augment(render_batch(heldout, [2**31 + i for i in range(len(heldout))]), g)
    return judge.eval(), judge_score(judge, x, heldout)


# --- the teacher --------------------------------------------------------------------------------------------------

def _text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval().requires_grad_(False)


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)


def _placeholder_vae() -> AutoencoderKL:
    """One level, so the pipeline's vae_scale_factor is 1 and its latents are pixels. Never run."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)


def denoising_loss(unet, noise_scheduler, context: torch.Tensor, scenes: list[Scene], rng: random.Random,
                   batch: int, empty_caption: float = 0.1, drawn=None) -> torch.Tensor:
    """One batch of the toy teacher's objective: v-prediction MSE on freshly rendered scenes, conditioned on their
    English captions (`context` rows, the last one the empty caption, used on `empty_caption` of the batch).
    `drawn(scene) -> scene`: what the image shows instead of the captioned scene (a style, benchmarks/style_lora.py)."""
    index = [rng.randrange(len(scenes)) for _ in range(batch)]
    x = render_batch([(drawn or (lambda scene: scene))(scenes[i]) for i in index], [rng.getrandbits(31) for _ in index])
    rows = torch.tensor([len(scenes) if rng.random() < empty_caption else i for i in index])
    noise = torch.randn_like(x)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
    v = unet(noise_scheduler.add_noise(x, noise, t), t, encoder_hidden_states=context[rows]).sample
    return F.mse_loss(v, noise_scheduler.get_velocity(x, noise, t))


def train_teacher(steps: int = 2000, batch: int = 32, seed: int = 0, lr: float = 2e-3,
                  empty_caption: float = 0.1) -> StableDiffusionPipeline:
    """The pixel-space teacher: the text encoder stays at its seeded random initialisation, the UNet learns."""
    from pea.models import _train_clip_tokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    scenes = all_scenes()
    english = [caption(s, ENGLISH) for s in scenes]
    tokenizer = _train_clip_tokenizer(english)
    pipe = StableDiffusionPipeline(vae=_placeholder_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
                                   unet=_unet(), scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # The conditioning exactly as the pipeline computes it at inference; row len(scenes) is the empty caption.
    context = pipe.encode_prompt(english + [""], "cpu", 1, False)[0]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, 100, steps)
    bar = progress_bar(range(steps), desc="train toy teacher", unit="step")
    for _ in bar:
        loss = denoising_loss(unet, noise_scheduler, context, scenes, rng, batch, empty_caption)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    unet.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score_teacher(pipe, judge: Judge, per_scene: int = 1, steps: int = 20, guidance: float = 1.5,
                  seed: int = 0) -> JudgeScore:
    """The teacher on every English caption of the world, `per_scene` seeds each, read by the judge."""
    from pea.models.pipeline import draw

    scenes = all_scenes() * per_scene
    images = []
    for start in range(0, len(scenes), 64):
        chunk = scenes[start:start + 64]
        images += draw(pipe, prompt=[caption(s, ENGLISH) for s in chunk], negative_prompt=[""] * len(chunk),
                       generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))],
                       num_inference_steps=steps, guidance_scale=guidance, height=IMAGE_SIZE, width=IMAGE_SIZE)
    return judge_score(judge, to_tensor(images), scenes)


def build(out: Path, teacher_steps: int = 2000, judge_steps: int = 1500, seed: int = 0) -> dict:
    """Train both and replace `out`/{teacher,judge,toy.json} atomically (a half-built toy is never visible)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        started = time.perf_counter()
        judge, judge_acc = train_judge(judge_steps, seed=seed)
        judge_seconds = time.perf_counter() - started
        judge.save(tmp / "judge")
        started = time.perf_counter()
        pipe = train_teacher(teacher_steps, seed=seed)
        teacher_seconds = time.perf_counter() - started
        pipe.unet.to(torch.float16)  # shipped at half size; loaded back as fp32
        pipe.save_pretrained(tmp / "teacher", safe_serialization=True)
        teacher = StableDiffusionPipeline.from_pretrained(tmp / "teacher", safety_checker=None,
                                                          requires_safety_checker=False)
        teacher.set_progress_bar_config(disable=True)
        record = {"seed": seed, "teacher_steps": teacher_steps, "teacher_seconds": round(teacher_seconds, 1),
                  "judge_steps": judge_steps, "judge_seconds": round(judge_seconds, 1),
                  "judge_heldout_accuracy": judge_acc.as_dict(),
                  "teacher_judged": score_teacher(teacher, judge).as_dict(), "threads": torch.get_num_threads()}
        (tmp / "toy.json").write_text(json.dumps(record, indent=2) + "\n")
        for name in ("teacher", "judge", "toy.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            out.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: data/toy")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the cores: "
                        "two multi-threaded torch jobs on two cores slow each other ~10x)")
    parser.add_argument("--check", action="store_true", help="only score the shipped teacher with the shipped judge")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or toy_dir()
    if args.check:
        pipe = StableDiffusionPipeline.from_pretrained(out / "teacher", safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        print(json.dumps(score_teacher(pipe, Judge.load(out / "judge")).as_dict(), indent=2))
        return
    print(json.dumps(build(out, args.teacher_steps, args.judge_steps, args.seed), indent=2))


if __name__ == "__main__":
    main()
