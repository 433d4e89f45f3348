"""Language specs: `data/languages/<lang>.yaml`, validated into a typed `LanguageSpec`.

A spec is the only thing a user writes to add a language. A *profile* (`data/profiles/<name>.yaml`)
is a partial spec deep-merged on top, e.g. `embedded` swaps the real model ids for the tiny offline
zoo and the manifests for the synthetic corpus. Every stage takes the part of the spec it needs.

Here: loading, profiles and merging, the language code, home/lake_root, and what a language is (LanguageSpec,
its teacher, student and synthetic captions). The per-stage sections (corpus, filter, embed, train and its
launcher, evaluate) are in pea.spec.sections and pea.spec.training and are importable from here.

    from pea.spec import load_spec
    spec = load_spec("zh", profile="embedded")
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

# The per-stage sections live in pea.spec.sections and pea.spec.training; specs are the project's public API, so
# every one of them is re-exported here and `from pea.spec import X` keeps working for each (import them from
# here, not from there).
from pea.spec.sections import (  # noqa: F401 (re-exported)
    ENGINE_ADDRESS,
    MANIFEST_FORMATS,
    URL_SCHEMES,
    CleaningSpec,
    ColumnMapping,
    CorpusSpec,
    DuckDBSpec,
    EngineSpec,
    EvaluateSpec,
    FilterSpec,
    LanguageIdSpec,
    ManifestSpec,
    Strict,
    SyntheticCorpus,
)
from pea.spec.training import (  # noqa: F401 (re-exported)
    DIFFUSION_ONLY,
    ENV_NAME,
    FORWARDED_ENV,
    DataSpec,
    EmbedSpec,
    LauncherSpec,
    PerturbationSpec,
    TrainSpec,
)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Short BCP-47: a 2-3 letter primary subtag, then up to two subtags (script/region), e.g. zh, zh-Hant, pt-BR.
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,2}$")


class SpecError(ValueError):
    """A spec or profile that cannot be used; the message names the file and the field."""


def home() -> Path:
    """The project root holding data/ and tracking/ ($PEA_HOME overrides the checkout)."""
    return Path(os.environ.get("PEA_HOME", PACKAGE_ROOT)).resolve()


def lake_root() -> Path:
    """Where every stage writes ($PEA_LAKE overrides data/lake)."""
    return Path(os.environ.get("PEA_LAKE", home() / "data" / "lake")).resolve()


def validate_language(code: str) -> str:
    if not isinstance(code, str) or not LANGUAGE_CODE.fullmatch(code):
        raise SpecError(
            f"language {code!r} is not a short BCP-47 tag such as 'zh', 'ja' or 'pt-BR'; "
            "use the code of a spec in data/languages/"
        )
    return code


class ModelRef(Strict):
    id: str = Field(description="Hugging Face model id or a local directory")
    revision: str | None = Field(None, description="git revision on the Hub (branch, tag or 40-hex commit), "
                                 "pinned to the commit it names when the model loads (pea.spec.hub); None for local dirs")
    variant: str | None = Field(None, description="weights variant to load, e.g. fp16 (model.fp16.safetensors); "
                                "None: the default weights")


class TeacherSpec(ModelRef):
    kind: Literal["sd15", "sdxl"] = "sd15"
    pixel_space: bool = Field(False, description="the UNet denoises pixels in [-1, 1] (the trained toy teacher, "
                              "docs/results.md): its pipeline's VAE does not downsample (vae_scale_factor 1) and is "
                              "never run; images are the pipeline's output_type='latent' result")
    safety_checker: bool = Field(False, description="SD 1.5 only: load the repo's safety_checker and "
                                 "feature_extractor, which black out images they flag. Off by default: evaluation "
                                 "compares every system's raw images at the same seeds (a blacked-out one would "
                                 "count as the adapter's failure), and the zoo and SDXL ship none. Turn it on (or "
                                 "`pea generate --safety-checker`) when images go to people")

    @model_validator(mode="after")
    def _safety_checker_is_sd15(self) -> TeacherSpec:
        if self.safety_checker and self.kind != "sd15":
            raise ValueError(f"teacher.safety_checker: {self.kind} pipelines have no safety checker; set it to "
                             "false and filter images with a separate classifier")
        return self


class StudentSpec(ModelRef):
    max_length: int = Field(77, ge=4, le=512, description="tokens per caption (77 for SD 1.5, 52 for SDXL in the "
                            "paper); at most the model's limits (pea.spec.lengths), checked again when it loads")
    trained_length: int | None = Field(None, ge=1, description="tokens the encoder was trained at, when its config "
                                       "allows more (Chinese-CLIP: 52 of 512); None: pea.spec.lengths.TRAINED_LENGTHS")
    padding: Literal["max_length"] = Field("max_length", description="pad to max_length: pooled = mean over all positions")
    truncation: bool = True

    @model_validator(mode="after")
    def _fits_the_trained_length(self) -> StudentSpec:
        from pea.spec.lengths import check_max_length

        check_max_length(self.id, self.max_length, self.trained_length)
        return self


SLOTS = ("count", "color", "shape", "position")  # a synthetic scene's attributes, in caption-template names
Slot = Literal["count", "color", "shape", "position"]


class CulturePhrase(Strict):
    """A target-language phrase for some attributes of a scene that English says otherwise (pea.corpus.culture)."""

    phrase: str = Field(min_length=1, description="e.g. 红日 (the red sun) for a red circle")
    means: dict[Slot, str] = Field(
        min_length=1, description="the attributes it stands for, in the English vocabulary: {color: red, shape: circle}")
    template: str | None = Field(None, description="a caption with the phrase and the slots it does not fill, e.g. "
                                 "'{count} come un arancino {position}'; None: the language's template with the "
                                 "phrase in the first slot it means and its other slots dropped")

    @model_validator(mode="after")
    def _template_fills_the_rest(self) -> CulturePhrase:
        if self.template is not None:
            rest = set(SLOTS) - set(self.means)
            used = set(re.findall(r"\{(\w+)\}", self.template))
            if used != rest or self.phrase not in self.template:
                raise ValueError(f"culture template {self.template!r} must hold the phrase {self.phrase!r} and the "
                                 f"slots {sorted(rest)} (the ones `means` leaves open), no others")
        return self


class SyntheticCaptions(Strict):
    """How the synthetic corpus says a scene in this language (English lives in pea.corpus)."""

    template: str = Field(description="uses {count} {color} {shape} {position}")
    colors: dict[str, str]
    shapes: dict[str, str]
    positions: dict[str, str]
    counts: dict[str, str]
    culture: list[CulturePhrase] = Field(default_factory=list, description="culture-specific phrases, said only in "
                                         "the corpus's native captions (corpus.synthetic.culture_rows)")

    @model_validator(mode="after")
    def _template_uses_every_slot(self) -> SyntheticCaptions:
        missing = [s for s in SLOTS if "{" + s + "}" not in self.template]
        if missing:
            raise ValueError(f"template must use {{{'}, {'.join(missing)}}}")
        return self


class LanguageSpec(Strict):
    language: str
    name: str
    teacher: TeacherSpec
    student: StudentSpec
    corpus: CorpusSpec
    filter: FilterSpec = FilterSpec()
    embed: EmbedSpec = EmbedSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    synthetic_captions: SyntheticCaptions | None = None

    @field_validator("language")
    @classmethod
    def _short_bcp47(cls, code: str) -> str:
        if not LANGUAGE_CODE.fullmatch(code):
            raise ValueError(f"{code!r} is not a short BCP-47 tag such as 'zh' or 'pt-BR'")
        return code

    @model_validator(mode="after")
    def _synthetic_needs_captions(self) -> LanguageSpec:
        if self.corpus.synthetic is not None and self.synthetic_captions is None:
            raise ValueError("corpus.synthetic needs synthetic_captions for this language")
        if self.evaluate.dictionary_baseline and self.synthetic_captions is None:
            raise ValueError("evaluate.dictionary_baseline translates with the synthetic_captions lexicon; add "
                             "synthetic_captions or turn the baseline off")
        return self

    @property
    def caption_column(self) -> str:
        return "caption_" + self.language.replace("-", "_")


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level")
    return data


def _explain(err: ValidationError, source: str) -> SpecError:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        hint = {"extra_forbidden": "unknown field; remove it or fix its spelling",
                "missing": "required field is missing"}.get(e["type"], e["msg"])
        lines.append(f"  {field}: {hint}")
    return SpecError(f"{source} is invalid:\n" + "\n".join(lines))


def available_languages(languages_dir: Path | None = None) -> list[str]:
    folder = languages_dir or home() / "data" / "languages"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def profiles(profile: str | None) -> list[str]:
    """'embedded,sdxl' → ['embedded', 'sdxl']: profiles stack, later ones on top."""
    names = [p.strip() for p in (profile or "").split(",") if p.strip()]
    for name in names:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise SpecError(f"profile {name!r} must be a plain name such as 'embedded'")
    return names


def load_spec(language: str, profile: str | None = None, *, data_dir: Path | None = None,
              zoo_dir: Path | None = None) -> LanguageSpec:
    """Read, merge and validate the spec of `language` (with optional profiles on top, comma-separated).

    Profiles may use `{language}`, `{zoo}` (the tiny model zoo, under the lake by default) and `{data}` (the
    data directory, e.g. `{data}/toy/teacher`, the shipped toy teacher).
    """
    validate_language(language)
    data_dir = data_dir or home() / "data"
    path = data_dir / "languages" / f"{language}.yaml"
    if not path.is_file():
        known = ", ".join(available_languages(data_dir / "languages")) or "none"
        raise SpecError(f"no spec for language {language!r} at {path}; known languages: {known}")
    raw = _read_yaml(path)
    if raw.get("language") != language:
        raise SpecError(f"{path}: field language is {raw.get('language')!r} but the file is named {language}.yaml")
    sources = [str(path)]
    zoo = str((zoo_dir or lake_root() / "zoo").resolve())
    for name in profiles(profile):
        profile_path = data_dir / "profiles" / f"{name}.yaml"
        if not profile_path.is_file():
            known = ", ".join(sorted(p.stem for p in (data_dir / "profiles").glob("*.yaml"))) or "none"
            raise SpecError(f"no profile {name!r} at {profile_path}; known profiles: {known}")
        text = profile_path.read_text(encoding="utf-8").replace("{language}", language).replace("{zoo}", zoo)
        text = text.replace("{data}", str(Path(data_dir).resolve()))
        overlay = yaml.safe_load(text) or {}
        if not isinstance(overlay, dict):
            raise SpecError(f"{profile_path}: expected a mapping of fields at the top level")
        raw = deep_merge(raw, overlay)
        sources.append(str(profile_path))
    source = " with profile ".join(sources)
    try:
        return LanguageSpec.model_validate(raw)
    except ValidationError as err:
        raise _explain(err, source) from None
