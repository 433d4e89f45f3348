"""Full-size models with random weights: the real architectures, configs and tokenizers, nothing downloaded.

The rehearsal of a real run (issue #17, benchmarks/full_size.py, profile `fullsize`): every tensor has the shape
and every tokenizer the vocabulary of the models the language specs name, so memory, time, precision and the
from_pretrained paths are those of a real run; only the weights are noise. Each model is saved with
save_pretrained in its Hub layout (safetensors; fp16 as `variant="fp16"` files, as the real repos ship them) and
loads through the same code a Hub id takes. Built once into `<lake>/zoo/full/<name>` (git-ignored), atomically.

    python -m pea.models.fullsize sd15 student-zh          # SD 1.5 ≈ 2 GB and Chinese-CLIP ViT-H ≈ 1.9 GB (fp16)

Models (configs copied from the public config.json files):
- `sd15`: stable-diffusion-v1-5: CLIP ViT-L/14 text encoder (123M) + CLIP's BPE tokenizer (49,408), UNet (860M,
  77×768 context), VAE (84M, scaling 0.18215), PNDM scheduler. No safety checker (the specs keep it off).
- `sdxl`: stable-diffusion-xl-base-1.0: CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 text encoders (123M + 695M, pooled
  1280), two tokenizers (pad `<|endoftext|>` / `!`), UNet (2.57B, 77×2048 context, text_time), VAE (scaling
  0.13025), Euler scheduler. ≈ 7 GB fp16: build it only to rehearse SDXL.
- `student-zh`: OFA-Sys/chinese-clip-vit-huge-patch14: RoBERTa-wwm-ext-large text tower (hidden 1024, 24
  layers, vocab 21,128) + ViT-H/14 image tower; Chinese BERT vocabulary.
- `student-it|ja|ru|vi`: BAAI/AltCLIP-m18: XLM-R large text tower (hidden 1024 → project_dim 768, vocab 250,002)
  + ViT-L/14 image tower.
- `student-ko`: Bingsu/clip-vit-large-patch14-ko: klue/roberta-large text tower (hidden 1024, vocab 32,000)
  + CLIP ViT-L/14 image tower (VisionTextDualEncoder).

Vocabularies: CLIP's BPE merges ship in the `open_clip_torch` wheel and the Chinese BERT vocab.txt in `cn_clip`:
read from the installed package, else from the wheel (`pip download --no-deps`, kept in `<root>/wheels/`;
neither package is imported or installed). XLM-R's sentencepiece model and klue's vocab ship in no PyPI
package: their tokenizers are trained on the language's synthetic captions with `tokenizers` and filled with
unused pieces up to the real vocabulary size, so embedding tables and token ids have the real range.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import torch

from pea.spec import lake_root

FULLSIZE_VERSION = 1  # bump when a config or tokenizer below changes, so built models are rebuilt
WHEELS = {"open_clip": ("open_clip_torch==3.3.0", "open_clip/bpe_simple_vocab_16e6.txt.gz"),
          "cn_clip": ("cn_clip==1.6.0", "cn_clip/clip/vocab.txt")}
ALTCLIP_LANGUAGES = ("it", "ja", "ru", "vi")

SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=512)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
                 downsample_padding=1)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True, norm_num_groups=32,
                 act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)
ZH_TEXT = dict(vocab_size=21128, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
               pad_token_id=0)
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
               image_size=224, patch_size=14, hidden_act="gelu")
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, hidden_act="quick_gelu")
XLMR_LARGE = dict(vocab_size=250002, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, project_dim=768)
KLUE_LARGE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2)


def root() -> Path:
    return lake_root() / "zoo" / "full"


def packaged_file(package: str, cache: Path) -> bytes:
    """A data file shipped inside a PyPI package: from the installed copy (found without importing it, so its
    heavy imports never run), else from its wheel fetched with `pip download --no-deps` into `cache`."""
    requirement, member = WHEELS[package]
    found = importlib.util.find_spec(package)
    if found is not None and found.submodule_search_locations:
        path = Path(next(iter(found.submodule_search_locations))).parent / member
        if path.is_file():
            return path.read_bytes()
    cache.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(cache.glob(f"{name}-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(cache)],
                              capture_output=True, text=True)
        wheels = sorted(cache.glob(f"{name}-*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"{member} (the real vocabulary) comes from the {requirement} wheel, which is neither "
                               f"installed nor in {cache}, and pip could not fetch it ({done.stderr.strip()[-300:]}); "
                               f"put the wheel there (`pip download --no-deps {requirement} -d {cache}`) or "
                               f"`pip install --no-deps {requirement}`")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return wheel.read(member)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte → printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_tokenizer(cache: Path, pad_token: str = "<|endoftext|>"):
    """openai/clip-vit-large-patch14's tokenizer (49,408 tokens) from open_clip's BPE file, built as OpenAI's
    SimpleTokenizer builds it: bytes, bytes + </w>, the first 48,894 merges, the two special tokens."""
    from transformers import CLIPTokenizer

    lines = gzip.decompress(packaged_file("open_clip", cache)).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        Path(scratch, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tokenizer = CLIPTokenizer(f"{scratch}/vocab.json", f"{scratch}/merges.txt", model_max_length=77,
                                  pad_token=pad_token)
    if len(tokenizer) != 49408:
        raise RuntimeError(f"the CLIP tokenizer built from {WHEELS['open_clip'][0]} has {len(tokenizer)} tokens, "
                           "not 49,408: the BPE file changed; pin the wheel that ships the original one")
    return tokenizer


def _wordpiece(vocab: list[str], lowercase: bool = True, **specials):
    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        # klue keeps case: lowercasing also strips accents, which splits Hangul into jamo (all [UNK]).
        return BertTokenizerFast(f"{scratch}/vocab.txt", do_lower_case=lowercase, model_max_length=512, **specials)


def _captions(language: str) -> list[str]:
    from pea.corpus.synthetic import all_scenes, caption
    from pea.spec import load_spec

    captions = load_spec(language).synthetic_captions
    if captions is None:
        raise ValueError(f"the {language} spec has no synthetic_captions, which its full-size tokenizer is trained "
                         "on; add them to data/languages/{language}.yaml")
    return [caption(s, captions) for s in all_scenes()]


def klue_tokenizer(language: str):
    """klue/roberta-large's layout (WordPiece, [CLS]=0 [PAD]=1 [SEP]=2 [UNK]=3 [MASK]=4), trained here, filled
    with [unused] pieces to 32,000: klue's vocabulary ships in no PyPI package."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=False)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    wp.train_from_iterator(_captions(language), trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials,
                                                                          show_progress=False))
    vocab = sorted(wp.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in vocab] + [f"[unused{i}]" for i in range(KLUE_LARGE["vocab_size"] - len(vocab))]
    return _wordpiece(pieces, lowercase=False, cls_token="[CLS]", pad_token="[PAD]", sep_token="[SEP]", unk_token="[UNK]",
                      mask_token="[MASK]")


def xlmr_tokenizer(language: str):
    """XLM-R's layout (sentencepiece Unigram, <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last), trained here on the
    language's captions and filled with unused pieces to 250,002: XLM-R's model ships in no PyPI package."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import XLMRobertaTokenizerFast

    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(_captions(language), trainers.UnigramTrainer(
        vocab_size=2000, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    pieces = json.loads(trained.to_str())["model"]["vocab"]
    fill = XLMR_LARGE["vocab_size"] - 1 - len(pieces)
    vocab = [tuple(p) for p in pieces] + [(f"▁<unused{i}>", -100.0) for i in range(fill)] + [("<mask>", 0.0)]
    sp = Tokenizer(models.Unigram(vocab, unk_id=3))
    sp.normalizer = normalizers.NFKC()
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=512)


def _save(model, tokenizer, out: Path) -> None:
    model.to(torch.float16).save_pretrained(out, safe_serialization=True, variant="fp16")
    tokenizer.save_pretrained(out)


def build_teacher(kind: str, out: Path, cache: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=text, tokenizer=clip_tokenizer(cache),
            unet=UNet2DConditionModel(**SD15_UNET), safety_checker=None, feature_extractor=None,
            scheduler=PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
            requires_safety_checker=False)
    elif kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE), text_encoder=text, tokenizer=clip_tokenizer(cache),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
            tokenizer_2=clip_tokenizer(cache, pad_token="!"), unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading"))
    else:
        raise ValueError(f"no full-size teacher {kind!r}; use sd15 or sdxl")
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True, variant="fp16")


def build_student(language: str, out: Path, cache: Path) -> None:
    from transformers import (
        AltCLIPConfig,
        AltCLIPModel,
        ChineseCLIPConfig,
        ChineseCLIPModel,
        CLIPVisionConfig,
        RobertaConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    torch.manual_seed(1)
    if language == "zh":
        tokenizer = _wordpiece(packaged_file("cn_clip", cache).decode("utf-8").splitlines())
        model = ChineseCLIPModel(ChineseCLIPConfig(text_config=ZH_TEXT, vision_config={**VIT_H14, "projection_dim": 1024},
                                                   projection_dim=1024))
    elif language in ALTCLIP_LANGUAGES:
        tokenizer = xlmr_tokenizer(language)
        model = AltCLIPModel(AltCLIPConfig(text_config=XLMR_LARGE, vision_config=VIT_L14, projection_dim=768))
    elif language == "ko":
        tokenizer = klue_tokenizer(language)
        model = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(
            CLIPVisionConfig(**VIT_L14), RobertaConfig(**KLUE_LARGE), projection_dim=768))
    else:
        raise ValueError(f"no full-size student for {language!r}; known: zh, ko, {', '.join(ALTCLIP_LANGUAGES)} "
                         "(add its public config to pea.models.fullsize)")
    _save(model, tokenizer, out)


@lru_cache(maxsize=None)
def _names() -> tuple[str, ...]:
    return ("sd15", "sdxl", "student-zh", "student-ko", *(f"student-{x}" for x in ALTCLIP_LANGUAGES))


def build(names: list[str], where: Path | None = None) -> dict[str, Path]:
    """Build (once) the named models into `where` (default <lake>/zoo/full); returns {name: directory}."""
    from pea.models import _atomic_build

    where = Path(where or root())
    unknown = [n for n in names if n not in _names()]
    if unknown:
        raise ValueError(f"no full-size model {unknown}; known: {', '.join(_names())}")
    built = {}
    for name in names:
        recipe = f"fullsize {FULLSIZE_VERSION} {name}"
        if name.startswith("student-"):
            language = name.removeprefix("student-")
            recipe += "\n" + "\n".join(_captions(language)) if language != "zh" else ""
            built[name] = _atomic_build(where / name, recipe, lambda out, x=language: build_student(x, out, where / "wheels"))
        else:
            built[name] = _atomic_build(where / name, recipe, lambda out, k=name: build_teacher(k, out, where / "wheels"))
    return built


def prepare(spec) -> dict[str, Path]:
    """Build the full-size models a spec names under <lake>/zoo/full (profile `fullsize`); others are left alone."""
    where = root()
    names = [Path(ref.id).name for ref in (spec.teacher, spec.student) if Path(ref.id).parent == where]
    return build(names, where) if names else {}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=_names())
    parser.add_argument("--root", type=Path, help="default: <lake>/zoo/full")
    args = parser.parse_args(argv)
    for name, path in build(args.names, args.root).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
