"""How many tokens a student encoder can take: `student.max_length` must fit every limit the model has.

Three limits, the smallest binds: the tokenizer's `model_max_length`; the position table of the model's
config (`max_position_embeddings`, less the padding offset of RoBERTa-style models, whose positions start
at pad_token_id + 1); and the length the encoder was trained at, which its config does not record
(`student.trained_length`, else the table below). Beyond the first two the model fails or reads garbage
positions; beyond the third it reads positions that contrastive training never aligned with images.
No heavy imports: pea.spec checks the trained length when a spec loads.
"""

from __future__ import annotations

# Encoders trained at fewer tokens than their config allows. Source: Chinese-CLIP
# (github.com/OFA-Sys/Chinese-CLIP): every released size was trained with context length 52, the default
# of `cn_clip.clip.tokenize(texts, context_length=52)`; the Hub configs keep RoBERTa's 512 positions.
TRAINED_LENGTHS = {f"OFA-Sys/chinese-clip-{size}": 52 for size in (
    "vit-base-patch16", "vit-large-patch14", "vit-large-patch14-336px", "vit-huge-patch14")}

# Text towers whose position ids start at pad_token_id + 1 (transformers' RobertaEmbeddings and copies).
PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                        "data2vec-text", "xmod", "altclip_text_model", "longformer"}
_UNSET = 10**6  # tokenizers without a limit report int(1e30)


def trained_length(model_id: str, declared: int | None) -> int | None:
    """The spec's `student.trained_length` if set, else the known value for this model id."""
    return declared if declared is not None else TRAINED_LENGTHS.get(model_id)


def position_limit(config) -> tuple[int, str] | None:
    """Usable positions of the (text tower's) config; None for relative positions (T5)."""
    text = getattr(config, "text_config", None) or config  # CLIP-style dual encoders: the text tower's config
    positions = getattr(text, "max_position_embeddings", None)
    if positions is None:
        return None
    if getattr(text, "model_type", None) in PADDING_OFFSET_TYPES:
        pad = text.pad_token_id if text.pad_token_id is not None else 1
        return positions - pad - 1, (f"the usable positions of its config (max_position_embeddings {positions} "
                                     f"less {pad + 1}: {text.model_type} positions start at pad_token_id + 1)")
    return positions, f"the positions of its config (max_position_embeddings {positions})"


def limits(model_id: str, declared_trained_length: int | None, tokenizer=None, config=None) -> list[tuple[int, str]]:
    """Every known (limit, what it is) of this student; tokenizer and config when they are at hand."""
    found = []
    trained = trained_length(model_id, declared_trained_length)
    if trained is not None:
        how = ("student.trained_length" if declared_trained_length is not None else
               "pea.spec.lengths.TRAINED_LENGTHS; student.trained_length overrides it")
        found.append((trained, f"the length it was trained at ({how})"))
    if tokenizer is not None and 0 < getattr(tokenizer, "model_max_length", _UNSET) < _UNSET:
        found.append((tokenizer.model_max_length, "its tokenizer's model_max_length"))
    if config is not None and (limit := position_limit(config)) is not None:
        found.append(limit)
    return found


def check_max_length(model_id: str, max_length: int, declared_trained_length: int | None = None,
                     tokenizer=None, config=None) -> None:
    """Refuse a max_length beyond the tightest limit, naming it and the fix."""
    over = [(limit, what) for limit, what in limits(model_id, declared_trained_length, tokenizer, config)
            if max_length > limit]
    if over:
        limit, what = min(over)
        raise ValueError(f"student.max_length={max_length} is more than {what}: {limit} tokens for {model_id}; "
                         f"set student.max_length to at most {limit} in the spec")
