"""benchmarks/lora_full_size.py's parts (#19): its captions are the translation its docstring says, an unseen LoRA
is sized to the effect asked for, and the attention's selectivity is measured and set as asked."""

import torch

import bench
from pea import models

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

    spread = full.cross_attention_spread(unet, latents, steps, context)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_q", "attn2.to_k")):  # the cross-attention's logits, doubled
                module.weight.mul_(2.0 ** 0.5)
    assert abs(full.cross_attention_spread(unet, latents, steps, context) / spread - 2.0) < 1e-3
