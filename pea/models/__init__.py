"""Load the teacher (English text-to-image model) and the student text encoder by id or path.

The same `from_pretrained` code loads a Hugging Face id (`stable-diffusion-v1-5/...`) or a local
directory; the tiny offline zoo (`build_tiny_zoo`) is saved in exactly the Hub layouts, so nothing
downstream knows whether a model is tiny. Weights load from safetensors only, and a Hub revision loads as
the commit it names now (pea.spec.hub), the same commit `model_key` records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
)

from pea.spec import ModelRef, StudentSpec, TeacherSpec
from pea.spec.hub import pinned_revision, safetensors_only
from pea.spec.lengths import check_max_length


def device() -> torch.device:
    """Where models run: $PEA_DEVICE if set (cpu, cuda, cuda:1, mps), else this process's GPU when there is one
    (cuda:$LOCAL_RANK, so each rank under the deepspeed launcher takes its own), else the CPU."""
    wanted = os.environ.get("PEA_DEVICE", "").strip()
    if wanted:
        try:
            chosen = torch.device(wanted)
        except RuntimeError as e:
            raise ValueError(f"PEA_DEVICE={wanted!r} is not a torch device ({e}); use cpu, cuda, cuda:N or mps") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"PEA_DEVICE={wanted!r} but torch sees no CUDA device; unset it or set PEA_DEVICE=cpu")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


# Every loader names its dtype: from fp16 files (variant "fp16", as the real repos ship them) diffusers would load
# fp32 while transformers 5 keeps fp16, and a pipeline mixing the two fails on the first UNet call ("mat1 and
# mat2 must have the same dtype"); the CPU has no fast fp16 kernels either. The frozen models run in fp32 by
# default; training holds its UNet in the spec's precision (pea.train).
def _kwargs(ref: ModelRef) -> dict:
    """Every loader's arguments: the pinned commit (what model_key records), safetensors, the variant."""
    return {"revision": pinned_revision(ref.id, ref.revision) or ref.revision, "use_safetensors": True,
            "variant": ref.variant}


PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(precision: str) -> torch.dtype:
    """The frozen UNet's dtype outside training (evaluation, promotion, generation): the spec's train.precision, as
    training holds it (bf16 is ~3x faster than fp32 at 512 px even on a CPU with AMX), except on a CPU without
    kernels for it: fp16 on any CPU, bf16 on one without fast bf16 (AVX2 only: an SD 1.5 UNet forward at 512 px
    took over 10 min in bf16 against 27 s in fp32). fp32 there."""
    dtype = PRECISIONS[precision]
    if device().type == "cpu" and (dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_bf16_is_fast())):
        return torch.float32
    return dtype


def cpu_bf16_is_fast() -> bool:
    """This CPU's oneDNN has bf16 kernels (AVX-512 BF16, AMX, or AVX-512 emulation), not a scalar fallback."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class TeacherText:
    """The teacher's English text path: the stock pipeline's own `encode_prompt`, loaded without its
    UNet and VAE, so stored conditioning is exactly what the pipeline would compute at inference."""

    pipe: DiffusionPipeline
    kind: str

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """sd15: {"tokens": (B, 77, 768)}; sdxl: {"tokens": (B, 77, 2048), "pooled": (B, 1280)}."""
        out = self.pipe.encode_prompt(captions, device=self.pipe.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
        if self.kind == "sdxl":
            return {"tokens": out[0], "pooled": out[2]}
        return {"tokens": out[0]}


@dataclass
class StudentEncoder:
    """A frozen non-English text encoder yielding per-token hidden states (B, max_length, d)."""

    tokenizer: object
    model: PreTrainedModel
    max_length: int
    padding: str = "max_length"
    truncation: bool = True

    @functools.cached_property
    def hidden_size(self) -> int:
        """The width of the states it yields, probed: some towers project them (AltCLIP's project_dim)."""
        return self.encode([""]).shape[-1]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        batch = self.tokenizer(captions, padding=self.padding, max_length=self.max_length, truncation=self.truncation,
                               return_tensors="pt").to(self.model.device)
        if batch["input_ids"].shape[1] > self.max_length:  # only possible with truncation off
            raise ValueError(f"a caption is longer than student.max_length={self.max_length} tokens and "
                             "student.truncation is off; raise max_length or turn truncation on in the spec")
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _pipeline_kwargs(ref: TeacherSpec, safety_checker: bool = False) -> dict:
    off = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {**_kwargs(ref), **(off if ref.kind == "sd15" and not safety_checker else {})}


def _load_pipeline(ref: TeacherSpec, safety_checker: bool = False, **parts) -> DiffusionPipeline:
    with safetensors_only("teacher", ref.id, ref.variant):
        return PIPELINES[ref.kind].from_pretrained(ref.id, **parts, **_pipeline_kwargs(ref, safety_checker))


def load_teacher_text(ref: TeacherSpec, dtype: torch.dtype = torch.float32) -> TeacherText:
    pipe = _load_pipeline(ref, unet=None, vae=None, dtype=dtype)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            _frozen(getattr(pipe, name))
    return TeacherText(pipe.to(device()), ref.kind)


def load_pipeline(ref: TeacherSpec, safety_checker: bool | None = None,
                  dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """The whole stock pipeline of the teacher (SD 1.5 or SDXL), everything frozen, in `dtype`; with the repo's safety
    checker when `safety_checker` (default: the spec's teacher.safety_checker) is on."""
    safety_checker = ref.safety_checker if safety_checker is None else safety_checker
    if safety_checker and ref.kind != "sd15":
        raise ValueError(f"teacher {ref.id} is {ref.kind}, which has no safety checker; turn the safety checker off")
    pipe = _load_pipeline(ref, safety_checker, dtype=dtype)
    if safety_checker and (pipe.safety_checker is None or pipe.feature_extractor is None):
        raise ValueError(f"the safety checker is on but teacher {ref.id} ships no safety_checker/feature_extractor "
                         "(its model_index.json names none); use a repo that has them (e.g. "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5), or set teacher.safety_checker: false "
                         "(pea generate --no-safety-checker)")
    if (pipe.vae_scale_factor == 1) != ref.pixel_space:
        raise ValueError(f"teacher {ref.id} has vae_scale_factor {pipe.vae_scale_factor}, but the spec says "
                         f"teacher.pixel_space: {ref.pixel_space}; set pixel_space: {pipe.vae_scale_factor == 1}")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            _frozen(module)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device())


def load_vae(ref: TeacherSpec) -> AutoencoderKL:
    """Always fp32, whatever the files hold: SDXL's VAE overflows to inf/NaN in fp16, and the reference encodes
    in fp32 too."""
    with safetensors_only("teacher", ref.id, ref.variant):
        vae = AutoencoderKL.from_pretrained(ref.id, subfolder="vae", dtype=torch.float32, **_kwargs(ref))
    return _frozen(vae).to(device())


def load_unet(ref: TeacherSpec, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    with safetensors_only("teacher", ref.id, ref.variant):
        unet = UNet2DConditionModel.from_pretrained(ref.id, subfolder="unet", dtype=dtype, **_kwargs(ref))
    return _frozen(unet).to(device())


def load_noise_scheduler(ref: TeacherSpec) -> DDPMScheduler:
    """The training noise schedule: DDPM with the teacher's own betas (scaled-linear for SD)."""
    return DDPMScheduler.from_pretrained(ref.id, subfolder="scheduler", revision=_kwargs(ref)["revision"])


def load_student(ref: StudentSpec, dtype: torch.dtype = torch.float32) -> StudentEncoder:
    """Any transformers encoder with per-token states: plain encoders, or the text tower of a dual
    encoder (CLIP-style configs with a text_config), or the encoder of an encoder-decoder (T5).
    Refuses a max_length beyond the tokenizer's, the config's or the trained limit (pea.spec.lengths)."""
    kwargs = _kwargs(ref)
    tokenizer = AutoTokenizer.from_pretrained(ref.id, revision=kwargs["revision"])
    check_max_length(ref.id, ref.max_length, ref.trained_length, tokenizer,
                     AutoConfig.from_pretrained(ref.id, revision=kwargs["revision"]))
    with safetensors_only("student", ref.id, ref.variant):
        model = AutoModel.from_pretrained(ref.id, dtype=dtype, **kwargs)
    if getattr(model, "text_model", None) is not None:  # CLIP, Chinese-CLIP, AltCLIP, ...: keep the text tower
        model = model.text_model
    elif getattr(model, "decoder", None) is not None:  # T5 / mT5: keep the encoder
        model = model.get_encoder()
    return StudentEncoder(tokenizer, _frozen(model).to(device()), ref.max_length, ref.padding, ref.truncation)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "pea-zoo.json"):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def model_key(ref: ModelRef) -> dict:
    """What identifies a model's weights for caching and lineage: id + the commit its revision names now
    (so the key changes when upstream moves), and for a local directory (no revision) a digest of its
    content; the variant when one is set."""
    key = {"id": ref.id, "revision": pinned_revision(ref.id, ref.revision)}
    if ref.variant is not None:
        key["variant"] = ref.variant
    path = Path(ref.id)
    if path.is_dir():
        stamp = path / "pea-zoo.json"
        key["content"] = json.loads(stamp.read_text())["fingerprint"] if stamp.is_file() else _tree_digest(path)
    return key


# --- The tiny offline zoo -------------------------------------------------------------------------
ZOO_VERSION = 1  # bump when the tiny architectures change, so caches keyed on the zoo are rebuilt


def _atomic_build(target: Path, recipe: str, build) -> Path:
    """Build into a temp dir beside `target`, then rename: a half-built model is never visible.
    A build whose recipe (zoo version + training captions) changed is rebuilt."""
    recipe = hashlib.sha256(f"{ZOO_VERSION}\n{recipe}".encode()).hexdigest()[:16]
    stamp = target / "pea-zoo.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "pea-zoo.json").write_text(json.dumps({"recipe": recipe, "fingerprint": _tree_digest(tmp)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _train_clip_tokenizer(captions: list[str]) -> CLIPTokenizer:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(captions, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        show_progress=False))
    # CLIPTokenizer is built from vocab.json + merges.txt, read once at construction.
    with tempfile.TemporaryDirectory() as scratch:
        bpe.model.save(scratch)
        return CLIPTokenizer(f"{scratch}/vocab.json", f"{scratch}/merges.txt", model_max_length=77)


def _train_wordpiece_tokenizer(captions: list[str]) -> BertTokenizerFast:
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # handle_chinese_chars splits Han characters into single tokens, as BERT-Chinese does.
    wp.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials,
                                                               show_progress=False))
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, wp.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return BertTokenizerFast(tokenizer_object=wp, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def _tiny_text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def _build_teacher(out: Path, captions: list[str], image_size: int, kind: str) -> None:
    """A tiny SD 1.5-style (one CLIP encoder, 32-wide conditioning) or SDXL-style teacher (two encoders,
    32 + 32 = 64-wide conditioning, pooled 32 from encoder 2's projection, size/crop time_ids)."""
    torch.manual_seed(0)
    tokenizer = _train_clip_tokenizer(captions)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size)
    unet_shape = dict(sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                      norm_num_groups=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(_tiny_text_config(tokenizer)), tokenizer=tokenizer,
            unet=UNet2DConditionModel(cross_attention_dim=32, **unet_shape), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        time_dim, pooled_dim = 8, 32
        unet = UNet2DConditionModel(cross_attention_dim=64, addition_embed_type="text_time",
                                    addition_time_embed_dim=time_dim,
                                    projection_class_embeddings_input_dim=6 * time_dim + pooled_dim, **unet_shape)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(_tiny_text_config(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(tokenizer, projection_dim=pooled_dim)),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out, safe_serialization=True)


def _build_student(out: Path, captions: list[str]) -> None:
    torch.manual_seed(1)
    tokenizer = _train_wordpiece_tokenizer(captions)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                 pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_tiny_zoo(zoo_dir: Path, english_captions: list[str], student_captions: dict[str, list[str]],
                   image_size: int = 32) -> dict[str, Path]:
    """Build (once) tiny SD 1.5- and SDXL-style teachers and one tiny student per language into `zoo_dir`.

    Randomly initialised, deterministic, seconds to build; tokenizers are trained on the captions
    they will see. Returns {name: path}; existing complete builds are reused.
    """
    zoo_dir = Path(zoo_dir)
    built = {}
    for kind in ("sd15", "sdxl"):
        built[f"{kind}-teacher"] = _atomic_build(
            zoo_dir / f"{kind}-teacher", f"{kind}\n{image_size}\n" + "\n".join(english_captions),
            lambda out, k=kind: _build_teacher(out, english_captions, image_size, k))
    for language, captions in student_captions.items():
        built[f"student-{language}"] = _atomic_build(zoo_dir / f"student-{language}", "\n".join(captions),
                                                     lambda out, c=captions: _build_student(out, c))
    return built


def _build_clip(out: Path, captions: list[str], image_size: int) -> None:
    # The PIL image processor: the default one needs torchvision, which this project does not install.
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    torch.manual_seed(2)
    tokenizer = _train_clip_tokenizer(captions)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=max(image_size // 4, 1), hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=_tiny_text_config(tokenizer).to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=16))
    model.save_pretrained(out, safe_serialization=True)
    size = {"shortest_edge": image_size}
    CLIPProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size}),
                  tokenizer=tokenizer).save_pretrained(out)


def build_tiny_clip(zoo_dir: Path, captions: list[str], image_size: int = 32) -> Path:
    """A tiny multilingual CLIP (image + text towers, randomly initialised) for CLIPScore in the embedded
    default: `<zoo_dir>/clip`, loadable with CLIPModel / CLIPProcessor like a Hub CLIP. Its scores only
    prove the metric's plumbing; they mean nothing until the towers are trained."""
    return _atomic_build(Path(zoo_dir) / "clip", f"clip\n{image_size}\n" + "\n".join(captions),
                         lambda out: _build_clip(out, captions, image_size))
