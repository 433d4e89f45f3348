"""What a registered version carries for generation: its *record*, the pyfunc's model_config (in the version's
MLmodel, so it travels with the artifacts and cannot be edited after registration as tags can).

    model_config(spec)                  # at registration: the record, as pea.registry.serving reads it too
    fetch(uri, dst) -> Fetched          # a version, its adapter and its record; one clear line if unreadable
    resolve(uri, client) -> ModelVersion
    settings(fetched, language, profile) -> Settings   # what `pea generate` loads and its defaults
    eval_spec(fetched, dst, language, profile) -> LanguageSpec  # what `pea eval` evaluates with

Keys (RECORD = 1): language; teacher_id, teacher_revision (the commit it named at registration; None for a local
folder), teacher_variant, teacher_kind (sd15/sdxl), teacher_pixel_space, teacher_safety_checker; student_id,
student_revision, student_variant, student_max_length, student_trained_length; scheduler (the teacher's scheduler
class, what evaluation drew with), guidance_scale, num_inference_steps, image_size (evaluate's and corpus's),
precision (train.precision: the frozen UNet's dtype, pea.models.inference_dtype). The registered settings win over
any profile: a version is drawn with the models it was trained with, whatever `--profile` the shell names. A
version registered before the record (no `record` key) needs the `--profile` it was trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pea.spec import LanguageSpec, StudentSpec, TeacherSpec

RECORD = 1
_NONE = (None, "None")  # lineage tags store None as text


def _scheduler(teacher: TeacherSpec, revision: str | None) -> str | None:
    """The class of the teacher's own scheduler (its scheduler_config.json), read from the files training used."""
    from diffusers import DDPMScheduler

    try:
        return DDPMScheduler.load_config(teacher.id, subfolder="scheduler", revision=revision).get("_class_name")
    except (OSError, ValueError):  # not readable here: the pipeline's own then, as evaluation drew with
        return None


def model_config(spec: LanguageSpec) -> dict[str, Any]:
    """The record of a version trained with `spec` (Hub revisions as the commits they name now)."""
    from pea.spec.hub import pinned_revision

    t, s = spec.teacher, spec.student
    teacher_revision = pinned_revision(t.id, t.revision)
    return {"record": RECORD, "language": spec.language,
            "teacher_id": t.id, "teacher_revision": teacher_revision, "teacher_variant": t.variant,
            "teacher_kind": t.kind, "teacher_pixel_space": t.pixel_space, "teacher_safety_checker": t.safety_checker,
            "student_id": s.id, "student_revision": pinned_revision(s.id, s.revision), "student_variant": s.variant,
            "student_max_length": s.max_length, "student_trained_length": s.trained_length,
            "scheduler": _scheduler(t, teacher_revision), "guidance_scale": spec.evaluate.guidance_scale,
            "num_inference_steps": spec.evaluate.inference_steps, "image_size": spec.corpus.image_size,
            "precision": spec.train.precision}


@contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's download progress bars off (unless the user asked for them): a command's error stays one line."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ.setdefault(name, "false")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)


def resolve(model_uri: str, client: Any) -> Any:
    """`models:/name@alias` or `models:/name/version` → the ModelVersion (client: an MlflowClient)."""
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, number = ref.split("/", 1)
        return client.get_model_version(name, number)
    raise SystemExit(f"model URI {model_uri!r} must look like models:/<name>@<alias> or models:/<name>/<version>; "
                     "pass such a --model-uri")


@dataclass(frozen=True)
class Fetched:
    uri: str
    version: Any                  # mlflow's ModelVersion: name, version, run_id, tags
    adapter_dir: Path
    config: dict[str, Any]        # the pyfunc's model_config; `record` in it when the version has a record

    @property
    def recorded(self) -> bool:
        return self.config.get("record") is not None

    @property
    def language(self) -> str | None:
        return self.config.get("language") or self.version.tags.get("language")


def fetch(uri: str, dst: Path) -> Fetched:
    """Download version `uri` (`models:/name@alias`, `models:/name/version`) into `dst`."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.models.model import MODEL_CONFIG

    from pea.io.redact import redact
    from pea.registry.registration import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        version = resolve(uri, MlflowClient())
    except MlflowException as err:
        raise SystemExit(f"{uri} cannot be read from the registry at {redact(tracking_uri())}: {redact(err.message)}; "
                         "start the tracking server or fix MLFLOW_TRACKING_URI, or pass --model-uri of a registered "
                         "version") from None
    with _quiet():
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}",
                                                         dst_path=str(dst)))
    config = Model.load(local).flavors.get("python_function", {}).get(MODEL_CONFIG) or {}
    return Fetched(uri, version, local / "artifacts" / "adapter", dict(config))


def _language(fetched: Fetched, language: str | None) -> str:
    """The version's language; `--language` must agree with it."""
    own = fetched.language
    if language is not None and own is not None and own != language:
        raise SystemExit(f"{fetched.uri} is an adapter for {own}, not {language}; pass --language {own} or the URI "
                         f"of a {language} adapter")
    if (language or own) is None:
        raise SystemExit(f"{fetched.uri} does not say its language; pass --language")
    return language or own


def _unrecorded(fetched: Fetched, profile: str | None) -> None:
    if not fetched.recorded and profile is None:
        raise SystemExit(f"{fetched.uri} (version {fetched.version.version}) was registered before versions recorded "
                         "their generation settings (teacher kind, pixel space, sizes); pass the --profile it was "
                         "trained with (e.g. --profile embedded,toy for the main job's), or register it again")


def _revision(value: Any) -> str | None:
    return None if value in _NONE else str(value)


def teacher(config: dict[str, Any]) -> TeacherSpec:
    return TeacherSpec(id=config["teacher_id"], revision=_revision(config.get("teacher_revision")),
                       variant=config.get("teacher_variant"), kind=config["teacher_kind"],
                       pixel_space=bool(config["teacher_pixel_space"]),
                       safety_checker=bool(config.get("teacher_safety_checker", False)))


def student(config: dict[str, Any]) -> StudentSpec:
    optional = {k: config[f"student_{k}"] for k in ("variant", "trained_length")
                if config.get(f"student_{k}") is not None}
    return StudentSpec(id=config["student_id"], revision=_revision(config.get("student_revision")),
                       max_length=config["student_max_length"], **optional)


@dataclass(frozen=True)
class Settings:
    """What generation loads and draws with by default."""
    language: str
    teacher: TeacherSpec
    student: StudentSpec
    precision: str
    image_size: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None = None


def settings(fetched: Fetched, language: str | None, profile: str | None) -> Settings:
    """The record's settings; for a version without one, the profile's with the models of its lineage tags."""
    from pea.spec import load_spec

    language = _language(fetched, language)
    _unrecorded(fetched, profile)
    c = fetched.config
    if fetched.recorded:
        return Settings(language, teacher(c), student(c), c["precision"], int(c["image_size"]),
                        int(c["num_inference_steps"]), float(c["guidance_scale"]), c.get("scheduler"))
    spec = load_spec(language, profile)
    tags = fetched.version.tags
    t = spec.teacher.model_copy(update={"id": tags.get("teacher_id", spec.teacher.id),
                                        "revision": _revision(tags.get("teacher_revision", spec.teacher.revision))})
    s = spec.student.model_copy(update={"id": tags.get("student_id", spec.student.id),
                                        "revision": _revision(tags.get("student_revision", spec.student.revision))})
    return Settings(language, t, s, spec.train.precision, spec.corpus.image_size, spec.evaluate.inference_steps,
                    spec.evaluate.guidance_scale)


def eval_spec(fetched: Fetched, dst: Path, language: str | None, profile: str | None) -> LanguageSpec:
    """The spec `pea eval` evaluates with. Recorded versions: the spec their run logged (spec.json: the evaluation
    and data settings the registered figures came from), else the profile's, with the record's models either way.
    Unrecorded ones: the profile's, which must name the models of the version's lineage."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    from pea.registry.registration import tracking_uri
    from pea.spec import load_spec

    language = _language(fetched, language)
    _unrecorded(fetched, profile)
    if not fetched.recorded:
        spec = load_spec(language, profile)
        for role, ref in (("teacher", spec.teacher), ("student", spec.student)):
            if fetched.version.tags.get(f"{role}_id") not in (None, ref.id):
                raise SystemExit(f"{fetched.uri} was trained with {role} {fetched.version.tags[f'{role}_id']} but the "
                                 f"spec for {language} (profile {profile}) names {ref.id}; pass the --profile it was "
                                 "trained with")
        return spec
    try:
        dst.mkdir(parents=True, exist_ok=True)
        with _quiet():
            logged = MlflowClient(tracking_uri()).download_artifacts(fetched.version.run_id, "spec.json", str(dst))
        spec = LanguageSpec.model_validate(json.loads(Path(logged).read_text(encoding="utf-8")))
    except (MlflowException, OSError, ValueError, ValidationError) as err:
        if profile is None:
            raise SystemExit(f"the spec of {fetched.uri}'s run {fetched.version.run_id} cannot be used "
                             f"({' '.join(str(err).split())[:200]}); pass --profile to evaluate with that profile's "
                             "settings (the models stay the version's)") from None
        spec = load_spec(language, profile)
    return spec.model_copy(update={"teacher": teacher(fetched.config), "student": student(fetched.config)})
