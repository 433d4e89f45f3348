"""The `pea` command: validate specs, build the tiny zoo, generate images with a registered adapter.

    pea validate zh [--profile embedded]
    pea zoo
    pea eval --language zh [--model-uri models:/pea-adapter-zh@champion]
    pea generate --language zh --prompt "左边有一个红色的圆形" [--model-uri models:/pea-adapter-zh@champion] --out a.png

A registered version carries the models and settings it was trained and evaluated with (pea.registry.record): `generate`
and `eval` use them, whatever `--profile` says (it is read only for versions registered before that record).

The whole pipeline runs as the Prefect flow: `python -m flows.pea_flow --language zh`.

A command that fails prints one line, `pea <command>: <error>`, masked (pea.io.redact: tracking-URI passwords, tokens,
signed URLs) and naming the fix; no traceback (PEA_DEBUG=1 prints it, masked too). Everything the command and the
libraries it calls print, their log lines included, passes through the same masking.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path


def _student_limits(ref) -> str:
    """Check max_length against the student's tokenizer and config when they are on this machine (a local
    directory or the Hugging Face cache); load_student checks them again in any case."""
    from transformers import AutoConfig, AutoTokenizer

    from pea.spec.hub import pinned_revision
    from pea.spec.lengths import check_max_length

    try:
        revision = pinned_revision(ref.id, ref.revision) or ref.revision
        tokenizer = AutoTokenizer.from_pretrained(ref.id, revision=revision)
        config = AutoConfig.from_pretrained(ref.id, revision=revision)
    except (OSError, ValueError) as err:
        return f"student {ref.id}: tokenizer and config not checked, not on this machine ({str(err).splitlines()[0]})"
    try:
        check_max_length(ref.id, ref.max_length, ref.trained_length, tokenizer, config)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return f"student {ref.id}{f' at {revision}' if revision else ''}: max_length {ref.max_length} fits its limits"


def _teacher_shapes(ref) -> str:
    """Check that the teacher's configs fit together and its kind, when they are on this machine (no weights
    read): the UNet's context width is its text encoders' (SD 1.5: one, 768; SDXL: two, 768 + 1280 = 2048), and an
    SDXL UNet's added embedding takes six time ids and encoder 2's projected pooled vector."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig

    from pea.spec.hub import pinned_revision

    try:
        revision = pinned_revision(ref.id, ref.revision) or ref.revision
        unet = UNet2DConditionModel.load_config(ref.id, subfolder="unet", revision=revision)
        encoders = [AutoConfig.from_pretrained(ref.id, subfolder=name, revision=revision)
                    for name in (("text_encoder",) if ref.kind == "sd15" else ("text_encoder", "text_encoder_2"))]
    except (OSError, ValueError) as err:
        return f"teacher {ref.id}: configs not checked, not on this machine ({str(err).splitlines()[0]})"
    context = sum(c.hidden_size for c in encoders)
    problems = []
    if unet["cross_attention_dim"] != context:
        problems.append(f"its UNet attends to {unet['cross_attention_dim']}-wide context but its text encoder(s) "
                        f"give {context}")
    sdxl_unet = unet.get("addition_embed_type") == "text_time"
    if sdxl_unet != (ref.kind == "sdxl"):
        problems.append(f"its UNet is {'SDXL' if sdxl_unet else 'SD 1.5'}-style (addition_embed_type "
                        f"{unet.get('addition_embed_type')!r}) but the spec says kind: {ref.kind}")
    elif sdxl_unet:
        pooled = getattr(encoders[1], "projection_dim", None)
        if unet["projection_class_embeddings_input_dim"] != 6 * unet["addition_time_embed_dim"] + (pooled or 0):
            problems.append(f"its UNet's added embedding takes {unet['projection_class_embeddings_input_dim']}, not "
                            f"6 time ids × {unet['addition_time_embed_dim']} + the {pooled}-wide pooled vector")
    if problems:
        raise SystemExit(f"teacher {ref.id}: " + "; ".join(problems) + "; fix teacher.id or teacher.kind in the spec")
    return (f"teacher {ref.id}{f' at {revision}' if revision else ''}: {ref.kind}, context "
            f"{unet['cross_attention_dim']} wide, {unet['in_channels']}-channel latents")


def _validate(args) -> None:
    from pea.spec import SpecError, load_spec

    try:
        spec = load_spec(args.language, args.profile)
    except SpecError as err:
        raise SystemExit(str(err)) from None
    print(_teacher_shapes(spec.teacher))
    print(_student_limits(spec.student))
    print(f"{spec.language} ({spec.name}): teacher {spec.teacher.id}, student {spec.student.id} — valid")


def _zoo(args) -> None:
    from pea.models.embedded import prepare_zoo

    for name, path in prepare_zoo().items():
        print(f"{name}: {path}")


def _generate(args) -> None:
    import diffusers
    import torch

    from pea.method.adapter import PEAAdapter
    from pea.models import device, inference_dtype, load_pipeline, load_student
    from pea.models.pipeline import generate
    from pea.registry.record import fetch, settings

    uri = _model_uri(args)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = fetch(uri, Path(tmp))
        adapter = PEAAdapter.from_pretrained(fetched.adapter_dir).eval().to(device())
    # The models the adapter was trained with, at the commits it recorded; the profile only for an older version.
    found = settings(fetched, args.language, args.profile)
    student = load_student(found.student)
    pipe = load_pipeline(found.teacher, safety_checker=args.safety_checker, dtype=inference_dtype(found.precision))
    if found.scheduler and type(pipe.scheduler).__name__ != found.scheduler:  # what evaluation drew with
        pipe.scheduler = getattr(diffusers, found.scheduler).from_config(pipe.scheduler.config)
    size = args.size if args.size is not None else found.image_size
    steps = args.steps if args.steps is not None else found.num_inference_steps
    guidance = args.guidance if args.guidance is not None else found.guidance_scale
    with torch.inference_mode():
        image = generate(pipe, adapter, student, [args.prompt], [args.seed], negative_prompt=args.negative_prompt,
                         num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)[0]
    image.save(args.out)
    print(f"{args.out} ← {uri} (base model {found.teacher.id}; {steps} steps, guidance {guidance:g}, {size} px)")


def _model_uri(args) -> str:
    from pea.spec import validate_language

    if args.model_uri:
        return args.model_uri
    if not args.language:
        raise SystemExit("name the adapter: pass --language (its champion) or --model-uri")
    return f"models:/pea-adapter-{validate_language(args.language)}@champion"


def _eval(args) -> None:
    from pea.embed import launch
    from pea.evaluate import evaluate, format_table
    from pea.registry.record import eval_spec, fetch
    from pea.spec import lake_root

    uri = _model_uri(args)
    lake = lake_root()
    with tempfile.TemporaryDirectory() as tmp:
        fetched = fetch(uri, Path(tmp))
        # The recorded models and the run's own evaluation settings, whatever profile the shell names.
        spec = eval_spec(fetched, Path(tmp), args.language, args.profile)
        pairs = args.pairs or lake / spec.language / "pairs" / "pairs.parquet"
        if not Path(pairs).is_file():
            raise SystemExit(f"no pairs table at {pairs}: run the flow for {spec.language} first "
                             f"(python -m flows.pea_flow --language {spec.language}) or pass --pairs")
        version = fetched.version
        embedded = launch(spec, lake, Path(pairs))  # embed.launcher's workers compute only rows the stores lack
        out = args.out or lake / spec.language / "eval" / f"{version.name}-v{version.version}"
        evaluation = evaluate(spec, Path(pairs), embedded, fetched.adapter_dir, Path(out))
    print(f"{uri} (version {version.version}) on {evaluation.heldout_pairs} held-out pairs and prompt sets "
          f"{', '.join(spec.evaluate.prompt_sets) or 'none'}; CLIP {spec.evaluate.clip_model}")
    print(format_table(evaluation))
    for path in [evaluation.grid, *evaluation.grids.values(), evaluation.table, evaluation.report]:
        print(path)


UNRECORDED = ("only read for a version registered before versions recorded their settings (pea.registry.record); a newer "
              "one is drawn and evaluated with its own, whatever the profile")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pea", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("validate", help="load and validate a language spec")
    p.add_argument("language")
    p.add_argument("--profile")
    p.set_defaults(run=_validate)
    p = sub.add_parser("zoo", help="build the tiny offline models of the embedded default")
    p.set_defaults(run=_zoo)
    p = sub.add_parser("eval", help="evaluate a registered adapter: print the table, write the grids")
    p.add_argument("--language", help="default: the adapter's own")
    p.add_argument("--model-uri", help="default: models:/pea-adapter-<language>@champion")
    p.add_argument("--profile", help=f"the profile the adapter was trained with; {UNRECORDED}")
    p.add_argument("--pairs", type=Path, help="default: <lake>/<language>/pairs/pairs.parquet")
    p.add_argument("--out", type=Path, help="default: <lake>/<language>/eval/<model>-v<version>")
    p.set_defaults(run=_eval)
    p = sub.add_parser("generate", help="draw an image from a target-language prompt with a registered adapter")
    p.add_argument("--language", help="default: the adapter's own")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--model-uri", help="default: models:/pea-adapter-<language>@champion")
    p.add_argument("--profile", help=f"the profile the adapter was trained with; {UNRECORDED}")
    p.add_argument("--out", type=Path, default=Path("pea.png"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="default: the version's (what its evaluation drew with)")
    p.add_argument("--guidance", type=float, help="default: the version's")
    p.add_argument("--size", type=int, help="default: the version's image size")
    p.add_argument("--safety-checker", action=argparse.BooleanOptionalAction, default=None,
                   help="SD 1.5: black out images the repo's safety checker flags (default: the spec's "
                        "teacher.safety_checker, off)")
    p.set_defaults(run=_generate)
    args = parser.parse_args(argv)
    status = run_masked(f"pea {args.run.__name__.lstrip('_')}", lambda: args.run(args))
    if status:  # success returns, so that in-process callers (benchmarks, tests) go on
        raise SystemExit(status)


def _fix(err: BaseException) -> str | None:
    """The fix for an error of the tracking server or the network (None for others: pea's own name theirs)."""
    from pea.io.redact import redact

    names = {c.__name__ for c in type(err).__mro__}
    if "MlflowException" in names or "RestException" in names:
        uri = redact(os.environ.get("MLFLOW_TRACKING_URI", "the embedded default's SQLite store"))
        return (f"; check that the MLflow tracking server at {uri} is up and MLFLOW_TRACKING_URI (and its credentials) "
                "are right, then rerun")
    if names & {"ConnectionError", "TimeoutError", "gaierror", "TransportError", "RequestException"}:
        return "; check the address and the network, then rerun"
    return None


def run_masked(name: str, command) -> int:  # noqa: ANN001 - any callable
    """Run `command` with stdout, stderr and every log handler masked; an error becomes one masked line naming the fix
    (exit 1). Returns the exit status."""
    from pea.io.redact import MaskedStream, mask_logging, one_line

    out, err_stream = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskedStream(out), MaskedStream(err_stream)
    mask_logging()
    try:
        command()
        return 0
    except SystemExit as exit_:  # pea's own refusals: already a sentence naming the fix
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(f"{name}: {' '.join(str(exit_.code).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error becomes one line
        if os.environ.get("PEA_DEBUG"):
            traceback.print_exc(file=sys.stderr)  # through the masked stream
        message = one_line(error)
        fix = _fix(error)
        if fix is None:  # pea's errors end in "; <the fix>"; anything else at least says how to see more
            fix = "" if "; " in message else "; rerun with PEA_DEBUG=1 for the (masked) traceback"
        print(f"{name}: {message}{fix}", file=sys.stderr)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err_stream


if __name__ == "__main__":
    main()
