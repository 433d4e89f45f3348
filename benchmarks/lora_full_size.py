"""Does #19's LoRA finding hold at SD 1.5's and SDXL's shapes? Distil at full size with random weights, then measure under
LoRAs the adapters never saw (docs/results.md, "Distilled at SD 1.5's shapes").

    python benchmarks/lora_full_size.py [--attention-spread 3]     # a CUDA device: ≈ 6.5 min on an H200
    python benchmarks/lora_full_size.py --model sdxl [--attention-spread 3]                     # SDXL's shapes
    python benchmarks/lora_full_size.py --device cpu --smoke       # every code path in a few steps, on the CPU

In the toy world (lora_robustness.py) the paper's adapter, one output token per student token, matches the
teacher's UNet output with tokens that a LoRA on the attention projections reads otherwise than the teacher's,
and aligning the teacher's 77 tokens (train.adapter_tokens: teacher + token_kd_weight) keeps most of the gap. The
toy UNet's projections are as wide as its context; SD 1.5's 320- and 640-wide ones are not injective on its
768-wide context. Here every shape is SD 1.5's:
- the UNet (pea.models.fullsize.SD15_UNET, 860 M), the teacher's CLIP ViT-L text encoder (SD15_TEXT) and the zh student's
  RoBERTa-large text tower (ZH_TEXT: 1024 wide, 52 tokens), all with random weights (nothing is downloaded);
- captions: 4-20 random "words" from a 5,000-word vocabulary, each word one token id in CLIP's vocabulary and one
  in the student's, the student's word order swapped pairwise (a translation that moves words): the student's
  states determine the teacher's context, though not position by position;
- random latents (4×32×32: the KD terms need no image, and the question is the projections' widths, not the
  resolution), uniform timesteps, pea.method.distill.distill_loss as pea.train calls it, AdamW on the adapter alone
  (DeepSpeed's engine is not what is measured), the UNet frozen in bf16 on a GPU (fp32 on the CPU).
Systems, each trained --steps on the same batches: `PEA` (the paper's adapter: output + feature KD), `aligned`
(the attention token mixer to the teacher's 77 tokens + token KD at weight 1: toy_table.py's attention_perturbed
without the perturbation), `aligned_perturbed` (+ half the steps under a random all-attention LoRA of up to 0.87×
the size that moves the teacher as much as the conditioning does: toy_table.py's ratio, 2 against 2.3).
Measured as in lora_robustness.py: held-out error against the teacher, and the gap (1 − err/err_untrained) kept
under random rank-4 LoRAs scaled to move the teacher's output by 1× and 3× the conditioning's effect.
Random weights make a cross-attention that hardly tells tokens apart (its logits spread ≈ 0.15 over the tokens),
which reads only the context's mean; `--attention-spread` scales to_q and to_k until the logits spread as far as
asked (3 picks tokens as trained attention does; a guess, no trained weights being here). On a CPU, `--latent-size 8 --encoder-layers 2` keep every width at a fraction of the cost.
`--model sdxl` builds SDXL's instead: its UNet (2.6 B; every cross-attention narrower than its 2048-wide context),
both CLIPs (penultimate states side by side, the second's pooled vector) and the time ids; the adapter outputs the
pooled vector too (pea.method.adapter). Last line: `fullsize_gap_kept_3x=<PEA>/<aligned>/<aligned_perturbed>` (all
attention at 3×, mean over the LoRAs; the systems run).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_WORDS, TEACHER_TOKENS, STUDENT_TOKENS = 20, 77, 52
CLIP_BOS, CLIP_EOS, BERT_CLS, BERT_SEP = 49406, 49407, 101, 102  # SD 1.5's CLIP tokenizer pads with its EOS


def make_captions(n: int, generator: torch.Generator, en_vocab: torch.Tensor, zh_vocab: torch.Tensor):
    """n random captions as (CLIP ids (n, 77), student ids (n, 52), student attention mask)."""
    lengths = torch.randint(4, MAX_WORDS + 1, (n, 1), generator=generator)
    words = torch.randint(0, len(en_vocab), (n, MAX_WORDS), generator=generator)
    position = torch.arange(MAX_WORDS).expand(n, -1)
    inside = position < lengths
    swapped = position ^ 1  # 1 0 3 2 …; a caption's odd last word stays where it is
    swapped = torch.where(swapped < lengths, swapped, position)
    en = torch.full((n, TEACHER_TOKENS), CLIP_EOS)
    en[:, 0] = CLIP_BOS
    en[:, 1:MAX_WORDS + 1] = torch.where(inside, en_vocab[words], CLIP_EOS)
    zh = torch.zeros((n, STUDENT_TOKENS), dtype=torch.long)
    zh[:, 0] = BERT_CLS
    zh[:, 1:MAX_WORDS + 1] = torch.where(inside, zh_vocab[words.gather(1, swapped)], 0)
    zh.scatter_(1, lengths + 1, BERT_SEP)
    return en, zh, torch.arange(STUDENT_TOKENS).expand(n, -1) < lengths + 2


@torch.no_grad()
def encode(teacher_encoders, student_encoder, en, zh, mask, device, dtype):
    """The teacher's context, its pooled vector (SDXL; else None) and the student's states, in `dtype`. SD 1.5
    takes its CLIP's last hidden state; SDXL both CLIPs' penultimate ones side by side (768 + 1280 = 2048) and the
    second's projected EOS state, its tokenizer padding with "!" (id 0) after the EOS as SDXL's tokenizer_2 does.
    (The pipelines' encode_prompt, which pea.models uses, takes text; these captions are token ids with no tokenizer.)"""
    is_eos = en == CLIP_EOS
    en_2 = en.masked_fill(is_eos & (is_eos.cumsum(1) > 1), 0)
    contexts, pooled, states = [], [], []
    for rows in torch.arange(len(en)).split(256):
        if len(teacher_encoders) == 1:
            contexts.append(teacher_encoders[0](input_ids=en[rows].to(device)).last_hidden_state.to(dtype))
        else:
            first = teacher_encoders[0](input_ids=en[rows].to(device), output_hidden_states=True)
            second = teacher_encoders[1](input_ids=en_2[rows].to(device), output_hidden_states=True)
            contexts.append(torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).to(dtype))
            pooled.append(second.text_embeds.to(dtype))
        states.append(student_encoder(input_ids=zh[rows].to(device),
                                      attention_mask=mask[rows].to(device)).last_hidden_state.to(dtype))
    return torch.cat(contexts), torch.cat(pooled) if pooled else None, torch.cat(states)


@torch.no_grad()
def cross_attention_spread(unet, noisy, steps, conditioning) -> float:
    """How selective the cross-attention is: the std over the context's tokens of the logits q·k/√d, mean over
    queries, heads and layers. Near 0 the attention reads only the tokens' mean (random weights); a trained
    UNet's attention picks tokens."""
    spreads = []

    def probe(module, args, kwargs):
        q = module.to_q(args[0]).unflatten(-1, (module.heads, -1)).transpose(1, 2)
        k = module.to_k(kwargs["encoder_hidden_states"]).unflatten(-1, (module.heads, -1)).transpose(1, 2)
        spreads.append(float((q @ k.transpose(-1, -2) * module.scale).float().std(dim=-1).mean()))

    handles = [module.register_forward_pre_hook(probe, with_kwargs=True)
               for name, module in unet.named_modules() if name.endswith("attn2")]
    try:
        unet(noisy, steps, **conditioning.unet_kwargs(unet.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return sum(spreads) / len(spreads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15", help="whose UNet and teacher shapes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--captions", type=int, default=8192, help="training captions (cycled)")
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--loras", type=int, default=2, help="random LoRAs per target and multiple")
    parser.add_argument("--attention-spread", type=float, default=None,
                        help="scale every attention's logits (to_q and to_k by the same factor) until the cross-"
                             "attention logits' spread over the tokens is this (random weights give near-uniform "
                             "attention, which reads only the tokens' mean); default: the random weights as built")
    parser.add_argument("--encoder-layers", type=int, default=None,
                        help="cut both text encoders to this depth (their widths, the question here, stay): CPU runs")
    parser.add_argument("--words", type=int, default=5000, help="the captions' vocabulary")
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (8: SD 1.5's widths at a CPU's cost)")
    parser.add_argument("--targets", nargs="+", choices=["all attention", "cross-attn to_k/to_v"],
                        default=["all attention", "cross-attn to_k/to_v"])
    parser.add_argument("--systems", nargs="+", default=["PEA", "aligned", "aligned_perturbed"])
    parser.add_argument("--smoke", action="store_true", help="a few steps and rows: every code path, no figures")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.captions, args.heldout, args.loras = 4, 2, 8, 4, 1

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from lora_robustness import TARGETS, gaps_kept, scale_lora, table_row
    from transformers import (
        BertConfig,
        BertModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    from pea.method.adapter import DEFAULT_DIMS, PEAAdapter
    from pea.method.distill import Conditioning, distill_loss, sdxl_time_ids
    from pea.method.perturb import RandomLoRA
    from pea.models.fullsize import (
        SCHEDULER,
        SD15_TEXT,
        SD15_UNET,
        SDXL_TEXT_2,
        SDXL_UNET,
        ZH_TEXT,
    )
    from pea.spec import PerturbationSpec

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    torch.manual_seed(0)
    sdxl, dims = args.model == "sdxl", DEFAULT_DIMS[args.model]
    with device:  # built where they run: random init of 1.3 B parameters on the CPU alone takes a minute
        unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)).to(dtype).requires_grad_(False).eval()
        depth = {"num_hidden_layers": args.encoder_layers} if args.encoder_layers else {}
        teacher_encoders = [CLIPTextModel(CLIPTextConfig(**SD15_TEXT | depth)).to(dtype).eval()]
        if sdxl:
            teacher_encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2 | depth)).to(dtype).eval())
        student_encoder = BertModel(BertConfig(**ZH_TEXT | depth), add_pooling_layer=False).to(dtype).eval()
    scheduler = DDPMScheduler(**SCHEDULER)
    words = torch.Generator().manual_seed(1)
    en_vocab = torch.randperm(CLIP_BOS - 1000, generator=words)[:args.words] + 1000
    zh_vocab = torch.randperm(ZH_TEXT["vocab_size"] - 1000, generator=words)[:args.words] + 1000
    train_captions = make_captions(args.captions, torch.Generator().manual_seed(2), en_vocab, zh_vocab)
    held_captions = make_captions(args.heldout, torch.Generator().manual_seed(3), en_vocab, zh_vocab)
    train_teacher, train_pooled, train_student = encode(teacher_encoders, student_encoder, *train_captions, device, dtype)
    held_teacher, held_pooled, held_student = encode(teacher_encoders, student_encoder, *held_captions, device, dtype)
    del teacher_encoders, student_encoder
    log(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}: {'SDXL' if sdxl else 'SD 1.5'} UNet, "
        f"{args.captions} training and {args.heldout} held-out captions encoded")

    def time_ids(n: int) -> torch.Tensor | None:  # SDXL's micro-conditioning for the latents' pixel size
        return sdxl_time_ids(8 * args.latent_size, 8 * args.latent_size, n).to(device) if sdxl else None

    def teacher_conditioning(tokens, pooled, rows) -> Conditioning:  # the teacher's, for these rows of a split
        return Conditioning(tokens[rows], None if pooled is None else pooled[rows], time_ids(len(rows)))

    def teacher_of(rows) -> Conditioning:
        return teacher_conditioning(held_teacher, held_pooled, rows)

    def adapter_of(adapter, rows) -> Conditioning:
        return Conditioning(*adapter(held_student[rows].float()), time_ids(len(rows)))

    # The held-out measure: one fixed draw of latents, noise and timesteps (pea.evaluate's timesteps).
    g = torch.Generator().manual_seed(4)
    held_latents = torch.randn(args.heldout, 4, args.latent_size, args.latent_size, generator=g)
    held_noise = torch.randn(held_latents.shape, generator=g)
    held_batches = [(t, rows) for t in (100, 400, 700, 900) for rows in torch.arange(args.heldout).split(64)]

    @torch.no_grad()
    def outputs(context_of) -> list[torch.Tensor]:
        out = []
        for t, rows in held_batches:
            steps = torch.full((len(rows),), t)
            noisy = scheduler.add_noise(held_latents[rows], held_noise[rows], steps).to(device, dtype)
            out.append(unet(noisy, steps.to(device), **context_of(rows).unet_kwargs(dtype)).sample.float())
        return out

    def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) / sum(float(y.pow(2).sum()) for y in b)

    def errors(systems: dict[str, torch.nn.Module]) -> dict[str, float]:
        reference = outputs(teacher_of)
        return {name: distance(outputs(lambda rows, a=adapter: adapter_of(a, rows)), reference)
                for name, adapter in systems.items()}

    def new_adapter(aligned: bool, seed: int = 0) -> PEAAdapter:
        torch.manual_seed(seed)
        mixer = {"student_tokens": STUDENT_TOKENS, "output_tokens": TEACHER_TOKENS,
                 "mixer_heads": dims["token_dim"] // 64} if aligned else {}  # heads of 64, as pea.train
        return PEAAdapter(kind=args.model, student_dim=ZH_TEXT["hidden_size"], hidden_dim=2048, **dims,
                          **mixer).to(device).eval()

    t, rows = held_batches[len(held_batches) // 2]
    steps = torch.full((len(rows),), t)
    probe_batch = (scheduler.add_noise(held_latents[rows], held_noise[rows], steps).to(device, dtype), steps.to(device),
                   teacher_of(rows))
    spread = cross_attention_spread(unet, *probe_batch)
    if args.attention_spread:
        with torch.no_grad():  # logits scale as the product of the to_q and to_k factors
            for module_name, module in unet.named_modules():
                if module_name.endswith(("to_q", "to_k")):
                    module.weight.mul_((args.attention_spread / spread) ** 0.5)
        spread, built = cross_attention_spread(unet, *probe_batch), spread
        log(f"attention logits scaled by {args.attention_spread / built:.1f}")
    log(f"cross-attention logits' spread over the tokens {spread:.2f}")
    untrained = new_adapter(aligned=False, seed=100)
    conditioning = errors({"untrained": untrained})["untrained"]
    # The perturbation's size: the all-attention LoRA (its own seed) that moves the teacher as much as the conditioning.
    probe = RandomLoRA(unet, PerturbationSpec(share=1.0, rank=4), seed=0, name="probe")
    teacher_plain = outputs(teacher_of)

    def teacher_moved() -> float:  # how far the applied LoRA moves the teacher's own output
        return distance(outputs(teacher_of), teacher_plain)

    size_1x, _ = scale_lora(probe, 99, conditioning, teacher_moved)
    probe.remove()
    log(f"conditioning's effect (untrained adapter's error) {conditioning:.4f}; an all-attention LoRA of "
        f"ρ = {size_1x:.2f} moves the teacher as much")

    def train(aligned: bool, token_weight: float, perturb: float) -> PEAAdapter:
        adapter = new_adapter(aligned).train()
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=0.1)
        warmup = max(1, args.steps // 12)  # then a cosine to a tenth of lr
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.55 + 0.45 * math.cos(
            math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup)))))
        perturbation = RandomLoRA(unet, PerturbationSpec(share=0.5, rank=4, relative_norm=perturb), seed=0) \
            if perturb else None
        batches = torch.Generator().manual_seed(5)  # the same batches, latents, noise and timesteps for every system
        for step in range(args.steps):
            rows = torch.randint(0, args.captions, (args.batch,), generator=batches)
            latents = torch.randn(args.batch, 4, args.latent_size, args.latent_size, generator=batches)
            noise = torch.randn(latents.shape, generator=batches)
            steps = torch.randint(0, 1000, (args.batch,), generator=batches)
            noisy = scheduler.add_noise(latents, noise, steps).to(device)
            if perturbation is not None:
                perturbation.draw(step)
            rows = rows.to(device)
            teacher = teacher_conditioning(train_teacher, train_pooled, rows)
            student = Conditioning(*adapter(train_student[rows].float()), teacher.time_ids)
            terms = distill_loss(unet, noisy, steps.to(device), noise.to(device), teacher, student,
                                 torch.zeros(args.batch, device=device), 1.0, 0.1, token_weight=token_weight)
            terms.total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
                log(f"  step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in terms.floats().items()
                                                   if k != "diffusion"))
        if perturbation is not None:
            perturbation.remove()
        return adapter.eval()

    systems = {"untrained": untrained}
    for name, aligned, token_weight, perturb in (("PEA", False, 0.0, 0.0), ("aligned", True, 1.0, 0.0),
                                                 ("aligned_perturbed", True, 1.0, 0.87 * size_1x)):
        if name not in args.systems:
            continue
        log(f"training {name} ({args.steps} steps of {args.batch})")
        systems[name] = train(aligned, token_weight, perturb)
    base = errors(systems)
    gaps = {k: 1 - base[k] / base["untrained"] for k in systems if k != "untrained"}
    log("held-out error without a LoRA: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))

    rows, kept_3x = [], {}
    for target in args.targets:
        for multiple in (1.0, 3.0):
            kept, effects, sizes = gaps_kept(unet, TARGETS[target], multiple * base["untrained"], args.loras, gaps,
                                             teacher_moved, lambda: errors(systems))
            rows.append(table_row(target, multiple, kept, effects, sizes, gaps))
            log(rows[-1])
            if target == "all attention" and multiple == 3.0:
                kept_3x = {k: statistics.fmean(v) for k, v in kept.items()}
    print("\nheld-out error: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
    print("\n| LoRA on | effect on the teacher | ‖B·A‖/‖W‖ | "
          + " | ".join(f"{k}: gap kept, mean (min)" for k in gaps) + " |")
    print("|---|---:|---:|" + "---:|" * len(gaps))
    print("\n".join(rows))
    if kept_3x:
        print("fullsize_gap_kept_3x=" + "/".join(f"{kept_3x[k]:.3f}" for k in gaps))


if __name__ == "__main__":
    main()
