"""The per-stage sections of a language spec: what corpus to acquire and how (CorpusSpec, ManifestSpec,
ColumnMapping), which pairs to keep (FilterSpec, CleaningSpec, LanguageIdSpec), and how to evaluate and promote
(EvaluateSpec). The launched stages' sections (embed, train, their launcher) are in pea.spec.training.

pea.spec assembles them, with the teacher, the student and the synthetic captions, into a LanguageSpec and
re-exports every name here: import them from pea.spec.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticCorpus(Strict):
    """The synthetic corpus (pea.corpus.synthetic). Its web-like noise is off by default: the clean world."""

    size: int = Field(400, ge=10, description="number of good parallel pairs")
    seed: int = 0
    mismatched: float = Field(0.0, ge=0, le=1, description="share of pairs (exactly, rounded) whose image shows "
                              "another scene: 1 to 4 of its attributes changed, as alt-text that describes another "
                              "picture; both captions stay a faithful pair")
    partial: float = Field(0.0, ge=0, le=1, description="share of parallel pairs whose captions (both languages) "
                           "leave the position out: alt-text that names only part of the scene")
    culture_rows: int = Field(0, ge=0, description="native-only rows (no English side) whose caption says one of "
                              "synthetic_captions.culture's phrases, beside `size`")
    native_mismatched: float | None = Field(None, ge=0, le=1, description="share of the culture_rows (exactly, "
                                            "rounded) whose image shows another scene; None: `mismatched`")


URL_SCHEMES = ("http", "https")  # the only schemes acquire fetches; anything else is dropped and counted


class ColumnMapping(Strict):
    """Which manifest column plays which role. Optional roles left unset are used when the manifest has a
    column of the role's own name (e.g. `similarity`), and are NULL otherwise; a role that is set must exist."""

    url: str = "url"
    caption_en: str | None = Field("caption_en", description="the English caption; None: the manifest has none "
                                                             "(every row is then a native-only target caption)")
    caption: str | None = Field(None, description="the target-language caption; None: caption_<language>")
    width: str | None = Field(None, description="image width as the manifest states it (before download)")
    height: str | None = None
    similarity: str | None = Field(None, description="image-text similarity (CLIP score), higher is better")
    punsafe: str | None = Field(None, description="probability that the image is unsafe")
    pwatermark: str | None = Field(None, description="probability that the image has a watermark")
    language: str | None = Field(None, description="language code of the row, used with ManifestSpec.languages")
    native: str | None = Field(None, description="boolean column: the target caption is native-only (not a "
                                                 "translation paired with caption_en)")


MANIFEST_FORMATS = ("parquet", "csv", "tsv", "jsonl")


class ManifestSpec(Strict):
    """One manifest: a local path (relative to the project home) or any fsspec URL (s3://, gs://, https://...)."""

    path: str
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
        "auto", description="auto: from the name (.parquet, .csv, .tsv, .jsonl/.json, each optionally .gz)")
    columns: ColumnMapping = ColumnMapping()
    native: bool = Field(False, description="every target caption here is native-only (e.g. LAION's multilingual "
                                            "TEXT, wukong): the diffusion loss applies to it, per the hybrid rule")
    languages: list[str] | None = Field(None, description="keep only rows whose language column is one of these "
                                                          "(before downloading); needs columns.language")

    @field_validator("path")
    @classmethod
    def _not_blank(cls, path: str) -> str:
        if not path.strip():
            raise ValueError("manifest path is empty")
        return path

    @model_validator(mode="after")
    def _languages_need_a_column(self) -> ManifestSpec:
        if self.languages is not None and self.columns.language is None:
            raise ValueError("languages needs columns.language (the manifest column that holds the row's language)")
        return self


# corpus.engine.address (and the flow's engine_address): 'auto', '<host>:<port>' (the GCS) or 'ray://<host>:<port>'.
ENGINE_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}")


class EngineSpec(Strict):
    """The distributed engine of the data stages: img2dataset's distributor for acquire, and where the filter's
    per-shard work runs. Ray (docs/architecture.md says why not Spark)."""

    kind: Literal["ray"] = "ray"
    address: str | None = Field(None, description="a running cluster: 'auto' (the one this node belongs to) or "
                                "'ray://<head>:10001'; None: start a local cluster for the stage and stop it after")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster when address is None "
                                                         "(None: every core)")

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str | None) -> str | None:
        if value is not None and not ENGINE_ADDRESS.fullmatch(value):
            raise ValueError(f"engine address {value!r} is not 'auto', 'ray://<host>:<port>' or '<host>:<port>'")
        return value


class DuckDBSpec(Strict):
    """Bounds of every DuckDB connection that can see a whole corpus (manifests, filter): beyond memory_limit
    DuckDB spills to spill_dir, so memory stays flat whatever the corpus."""

    memory_limit: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$",
                              description="e.g. 2GB, 512MiB")
    spill_dir: str | None = Field(None, description="where DuckDB spills (a fast local disk); None: a folder "
                                                    "beside each stage's output; removed after each stage")
    threads: int | None = Field(None, ge=1, description="DuckDB's threads; None: every core")

    def spill(self, default: Any, name: str) -> Any:
        """A stage's own spill folder: under spill_dir when set, else under `default` (a Path)."""
        from pathlib import Path

        return (Path(self.spill_dir) if self.spill_dir else Path(default)) / name


class CorpusSpec(Strict):
    manifests: list[ManifestSpec] = Field(default_factory=list, description="one or more manifests, read in order; "
                                          "a plain string is a path with the default column mapping")
    synthetic: SyntheticCorpus | None = Field(None, description="generate and serve a synthetic corpus instead")
    image_size: int = Field(512, ge=8, description="img2dataset's output resolution")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "keep_ratio_largest", "no"] = "center_crop"
    encode_format: Literal["png", "jpg", "webp"] = Field("png", description="also the raw shards' image column name")
    encode_quality: int | None = Field(None, ge=0, le=100, description="jpg/webp 0-100, png 0-9 (zlib level); "
                                                                       "None: 95 for jpg/webp, 9 for png")
    output_format: Literal["parquet", "webdataset"] = Field(
        "parquet", description="parquet: images inside the raw shards (what embed reads); webdataset: .tar shards "
                               "beside a metadata .parquet, for cluster data loaders")
    engine: EngineSpec | None = Field(None, description="run acquire and filter on this distributed engine "
                                      "(docs/data.md); None: on this machine, as img2dataset's multiprocessing")
    duckdb: DuckDBSpec = Field(default_factory=lambda: DuckDBSpec(), description="bounds for DuckDB over the corpus")
    processes: int = Field(1, ge=1)
    threads: int = Field(8, ge=1)
    timeout_s: int = Field(10, ge=1, description="per download, the whole body included (not just each read)")
    retries: int = Field(0, ge=0)
    max_download_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger bodies are dropped unread")
    min_image_size: int = Field(0, ge=0, description="img2dataset guard: smaller decoded sides are not stored")
    max_image_area: int = Field(100_000_000, ge=64, description="img2dataset guard against decompression bombs")
    rows_per_shard: int = Field(10_000, ge=10)
    allow_networks: list[str] = Field(default_factory=list, description="CIDRs the download may reach besides "
                                      "public addresses (e.g. ['10.8.0.0/16'] for an internal image store); "
                                      "loopback, private, link-local, multicast and reserved ones are refused "
                                      "otherwise (pea.io.addresses)")

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, cidrs: list[str]) -> list[str]:
        from pea.io.addresses import networks

        return [str(n) for n in networks(cidrs)]

    @field_validator("manifests", mode="before")
    @classmethod
    def _paths_are_manifests(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": m} if isinstance(m, str) else m for m in value]
        return value

    @field_validator("encode_quality")
    @classmethod
    def _quality_in_range(cls, quality: int | None, info: Any) -> int | None:
        if quality is not None and info.data.get("encode_format") == "png" and quality > 9:
            raise ValueError("for png, encode_quality is the zlib level 0-9")
        return quality

    @model_validator(mode="after")
    def _has_a_source(self) -> CorpusSpec:
        if not self.manifests and self.synthetic is None:
            raise ValueError("name at least one manifest, or set synthetic")
        return self


class CleaningSpec(Strict):
    """How captions are cleaned before any length or language check (the cleaned text is what pairs.parquet holds)."""

    fix_text: bool = Field(True, description="ftfy: repair mojibake, HTML entities, control characters")
    unicode_form: Literal["NFC", "NFKC"] | None = Field("NFC", description="Unicode normalization of the result")
    opencc: str | None = Field(None, description="OpenCC conversion of target captions, e.g. t2s (to simplified)")
    keep_only: str | None = Field(None, description="a regex character class body: target captions that contain "
                                                    "`keep_only_if` lose every other character (e.g. zh: CJK, digits, "
                                                    "punctuation)")
    keep_only_if: str | None = Field(None, description="regex that a caption must contain for keep_only to apply")
    keep_only_for: Literal["native", "all"] = Field("native", description="which target captions keep_only cleans")

    @field_validator("keep_only", "keep_only_if")
    @classmethod
    def _regex_compiles(cls, value: str | None, info: Any) -> str | None:
        if value is not None:
            import pyarrow as pa  # the filter runs these with Arrow's RE2, so RE2 must accept them
            import pyarrow.compute as pc

            pattern = f"[^{value}]" if info.field_name == "keep_only" else value
            try:
                pc.replace_substring_regex(pa.array([""]), pattern=pattern, replacement="")
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(f"{value!r} is not a valid RE2 pattern: {err}") from None
        return value


class LanguageIdSpec(Strict):
    """The target caption must be in the target language, as lingua-language-detector judges it."""

    candidates: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes lingua chooses "
                                  "among besides the target language (the likely confusions)")
    min_confidence: float = Field(0.5, ge=0, le=1, description="lingua's confidence for the target language")
    low_accuracy: bool = Field(False, description="lingua's faster low-accuracy mode (less reliable on short text)")


class FilterSpec(Strict):
    min_image_side: int = Field(64, ge=1)
    max_image_pixels: int | None = Field(None, ge=1, description="original width x height above this: too_large")
    max_aspect_ratio: float = Field(2.0, ge=1.0)
    min_caption_chars: int = Field(1, ge=1, description="after cleaning; 0 characters is caption_empty")
    max_caption_chars: int = Field(300, ge=1)
    min_text_ratio: float = Field(0.5, ge=0, le=1, description="letters / non-space characters below this: "
                                                               "caption_not_text")
    min_similarity: float | None = Field(None, description="where the manifest has similarity")
    max_punsafe: float | None = Field(None, ge=0, le=1, description="where the manifest has punsafe")
    max_pwatermark: float | None = Field(None, ge=0, le=1, description="where the manifest has pwatermark")
    max_images_per_caption_pair: int | None = Field(
        4, ge=1, description="a caption pair on more distinct images than this is a template/spam duplicate; "
                             "1 keeps one image per pair; None: no limit")
    cleaning: CleaningSpec = CleaningSpec()
    language_id: LanguageIdSpec | None = Field(LanguageIdSpec(), description="None: no language check")
    where: str | None = Field(None, max_length=2000, description="a custom DuckDB boolean expression over the "
                              "judged columns (docs/data.md); rows for which it is not true are dropped")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> FilterSpec:
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError("min_caption_chars is larger than max_caption_chars")
        return self


class EvaluateSpec(Strict):
    heldout_percent: int = Field(10, ge=1, le=50, description="share of pairs held out, chosen by hash")
    heldout_rows: int = Field(512, ge=1, description="held-out pairs evaluation and promotion score: the lowest "
                              "pair hashes first, so the sample is the same in every run")
    timesteps: list[int] = Field(default_factory=lambda: [100, 400, 700, 900])
    grid_prompts: int = Field(4, ge=1)
    inference_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    seed: int = 0
    clip_model: str = Field("BAAI/AltCLIP-m18", description="CLIP for CLIPScore (Hub id or local dir) that reads "
                            "the target language: a multilingual CLIP (AltCLIP-m18 covers every shipped language; "
                            "a Chinese-CLIP for zh); the embedded profile names the tiny offline one")
    clip_revision: str | None = Field("main", description="git revision of clip_model; None for local dirs")
    prompt_sets: list[str] = Field(default_factory=lambda: ["general", "culture"], description="files "
                                   "data/prompts/<language>/<name>.txt of `target<TAB>english` lines")
    prompts_per_set: int | None = Field(None, ge=1, description="use the first N prompts of each set; None: all")
    linear_map_rows: int = Field(4096, ge=2, description="training pairs the least-squares baseline is fit on (the "
                                 "first rows of the seeded training stream)")
    judge: str | None = Field(None, description="an attribute judge (pea.models.toy, e.g. '{data}/toy/judge'): score "
                              "whether each system draws what held-out synthetic prompts name; None: no judge")
    judge_seeds: int = Field(4, ge=1, description="images per held-out prompt and system for the judge")
    judged_sets: list[str] = Field(default_factory=list, description="prompt sets data/prompts/<language>/<name>.txt "
                                   "of synthetic scenes the judge also scores, e.g. ['synthetic-culture'] (needs judge)")
    diffusion_only_baseline: bool = Field(False, description="also train the adapter with the diffusion loss "
                                          "alone (train.diffusion_loss: all) and put it in the table")
    dictionary_baseline: bool = Field(False, description="also translate prompts word by word into English with "
                                      "the synthetic_captions lexicon and feed them to the teacher (the paper's "
                                      "translation baseline in miniature); needs synthetic_captions")
    promotion_metric: Literal["rel_error", "clip_score"] = Field(
        "rel_error", description="what decides promotion: held-out UNet-output relative error to the teacher "
                                 "(lower is better) or mean CLIPScore over the prompt sets (higher is better)")
    promotion_tolerance: float = Field(0.0, ge=0, le=1, description="relative regression allowed against the "
                                       "champion: 0.02 lets a challenger be at most 2% worse and still be promoted")
    promotion_requires_beating_untrained: bool = Field(True, description="a challenger must also beat the untrained "
                                                       "adapter on the promotion metric")

    @field_validator("prompt_sets", "judged_sets")
    @classmethod
    def _plain_set_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
                raise ValueError(f"prompt set {name!r} must be a plain file stem such as 'general'")
        return names

    @model_validator(mode="after")
    def _judged_sets_need_the_judge(self) -> EvaluateSpec:
        if self.judged_sets and self.judge is None:
            raise ValueError(f"evaluate.judged_sets {self.judged_sets} needs evaluate.judge (the attribute judge of "
                             "the toy world); set judge or empty judged_sets")
        return self
