"""The embedded default's offline world: the tiny model zoo, built from the synthetic captions.

The teacher's tokenizer is trained on every English synthetic caption and each student's on its own
language's captions (from every shipped spec that has `synthetic_captions`), so the zoo is the same
whichever language runs first. Built once into `<lake>/zoo/` and reused.
"""

from __future__ import annotations

from pathlib import Path

from pea.corpus.synthetic import ENGLISH, all_scenes, caption, culture_scenes
from pea.models import build_tiny_clip, build_tiny_zoo
from pea.spec import available_languages, lake_root, load_spec


def prepare_zoo(zoo_dir: Path | None = None, image_size: int = 32) -> dict[str, Path]:
    scenes = all_scenes()
    students = {}
    for language in available_languages():
        captions = load_spec(language).synthetic_captions
        if captions is not None:  # the culture phrases too: a tokenizer knows a language's words, seen or not
            training, heldout = culture_scenes(captions)
            students[language] = [caption(s, captions) for s in scenes] + [c for _, c in training + heldout]
    english = [caption(s, ENGLISH) for s in scenes]
    zoo = zoo_dir or lake_root() / "zoo"
    built = build_tiny_zoo(zoo, english, students, image_size=image_size)
    # CLIPScore's tiny multilingual CLIP reads every language's captions and the English references.
    built["clip"] = build_tiny_clip(zoo, english + [c for captions in students.values() for c in captions], image_size)
    return built
