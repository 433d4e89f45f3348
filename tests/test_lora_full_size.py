"""benchmarks/lora_full_size.py's parts (#19): its captions are the translation its docstring says, an unseen LoRA
is sized to the effect asked for, and the attention's selectivity is measured and set as asked."""

import bench
import torch

from pea import models
from pea.method.distill import Conditioning

full = bench.load("lora_full_size")
robustness = bench.load("lora_robustness")


def test_the_student_caption_is_the_english_words_swapped_pairwise():
    words = 300
    en_vocab, zh_vocab = torch.randperm(40_000)[:words] + 1000, torch.randperm(20_000)[:words] + 1000
    en, zh, mask = full.make_captions(64, torch.Generator().manual_seed(0), en_vocab, zh_vocab)
    assert en.shape == (64, 77) and zh.shape == mask.shape == (64, 52)
    en_word = {int(t): w for w, t in enumerate(en_vocab)}
    zh_word = {int(t): w for w, t in enumerate(zh_vocab)}
    for e, z, m in zip(en.tolist(), zh.tolist(), mask.tolist()):
        n = e.index(full.CLIP_EOS) - 1
        assert 4 <= n <= full.MAX_WORDS and e[0] == full.CLIP_BOS and set(e[n + 1:]) == {full.CLIP_EOS}
        assert z[0] == full.BERT_CLS and z[n + 1] == full.BERT_SEP and set(z[n + 2:]) == {0}
        assert m == [True] * (n + 2) + [False] * (52 - n - 2)
        english = [en_word[t] for t in e[1:n + 1]]
        student = [zh_word[t] for t in z[1:n + 1]]
        assert student == [english[j ^ 1] if j ^ 1 < n else english[j] for j in range(n)]


def test_the_teacher_context_is_sd15s_last_state_or_sdxls_two_penultimate_states_side_by_side():
    from transformers import (
        BertConfig,
        BertModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    torch.manual_seed(0)
    clip = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    first = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **clip)).eval()
    second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=40, **clip)).eval()
    student = BertModel(BertConfig(vocab_size=21128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2), add_pooling_layer=False).eval()
    vocab = torch.arange(1000, 1300)
    en, zh, mask = full.make_captions(6, torch.Generator().manual_seed(0), vocab, vocab)

    context, pooled, states = full.encode([first], student, en, zh, mask, "cpu", torch.float32)
    with torch.no_grad():
        assert pooled is None and torch.equal(context, first(input_ids=en).last_hidden_state)
        assert torch.equal(states, student(input_ids=zh, attention_mask=mask).last_hidden_state)

        context, pooled, _ = full.encode([first, second], student, en, zh, mask, "cpu", torch.float32)
        assert context.shape == (6, 77, 32 + 48) and pooled.shape == (6, 40)
        assert torch.equal(context[..., :32], first(input_ids=en, output_hidden_states=True).hidden_states[-2])
        # SDXL's tokenizer_2 pads with "!" (id 0) after the caption's EOS, its first one pads with the EOS
        padded = en.clone()
        for row in padded:
            row[int((row == full.CLIP_EOS).nonzero()[0]) + 1:] = 0
        out = second(input_ids=padded, output_hidden_states=True)
        assert torch.equal(context[..., 32:], out.hidden_states[-2]) and torch.equal(pooled, out.text_embeds)


def test_an_unseen_lora_is_sized_to_the_effect_asked_for_and_attention_spread_is_set(zh_spec):
    unet = models.load_unet(zh_spec.teacher)
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents, steps = torch.randn(4, unet.config.in_channels, size, size, generator=g), torch.tensor([50, 300, 600, 900])
    context = torch.randn(4, 77, unet.config.cross_attention_dim, generator=g)

    def out():
        with torch.no_grad():
            return unet(latents, steps, encoder_hidden_states=context).sample

    plain = out()
    lora = robustness.unseen_lora(unet, robustness.TARGETS["all attention"], seed=0)
    rho, effect = robustness.scale_lora(lora, 0, 0.05, lambda: float((out() - plain).pow(2).sum() / plain.pow(2).sum()))
    assert rho > 0 and abs(effect / 0.05 - 1) < 0.03
    lora.remove()
    assert torch.equal(out(), plain)  # the UNet is back as loaded

    spread = full.cross_attention_spread(unet, latents, steps, Conditioning(context))
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_q", "attn2.to_k")):  # the cross-attention's logits, doubled
                module.weight.mul_(2.0 ** 0.5)
    assert abs(full.cross_attention_spread(unet, latents, steps, Conditioning(context)) / spread - 2.0) < 1e-3
