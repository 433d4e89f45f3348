"""Culture-specific phrases of the synthetic world: target-language words for a scene that English says otherwise.

    .venv/bin/python -m pea.corpus.culture            # rewrite data/prompts/<lang>/synthetic-culture.txt for every language

A spec's `synthetic_captions.culture` lists phrases such as zh 红日 ("the red sun": one word for a red circle)
or vi bánh chưng (the square green rice cake): each stands for some attributes of a scene (`means`) and
fills the caption's other slots with the language's ordinary words. A word-by-word dictionary knows none of
them, so only an adapter that learned them from native captions (which have no English side) draws them.

Each phrase's scenes are split once, by caption hash: about a third are held out as the language's
"synthetic-culture" prompt set (the English column is the scene's plain English description, which the
teacher is given); the corpus's native rows use only the rest (`culture_rows`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re

from pea.corpus.synthetic import ENGLISH, Scene, caption
from pea.spec import SLOTS, CulturePhrase, SyntheticCaptions, available_languages, home, load_spec

PROMPT_SET = "synthetic-culture"
HELD_OUT_SHARE = 3  # one scene in three of each phrase is held out


def culture_caption(scene: Scene, phrase: CulturePhrase, captions: SyntheticCaptions) -> str:
    """The caption of `scene` that says the phrase for the attributes the phrase means."""
    for slot, value in phrase.means.items():
        if getattr(scene, slot) != value:
            raise ValueError(f"{phrase.phrase!r} means {slot} {value}, but the scene's {slot} is {getattr(scene, slot)}")
    template = phrase.template or _default_template(phrase, captions.template)
    words = {slot: getattr(captions, slot + "s")[getattr(scene, slot)] for slot in SLOTS if slot not in phrase.means}
    return " ".join(template.format(**words).split())


def _default_template(phrase: CulturePhrase, template: str) -> str:
    """The language's template with the phrase in the first slot it means and its other slots dropped."""
    slots = [s for s in re.findall(r"\{(\w+)\}", template) if s in phrase.means]
    out = template.replace("{" + slots[0] + "}", phrase.phrase.replace("{", "{{").replace("}", "}}"), 1)
    for slot in slots[1:]:
        out = out.replace("{" + slot + "}", "")
    return out


def _scenes_of(phrase: CulturePhrase) -> list[Scene]:
    choices = [[phrase.means[s]] if s in phrase.means else list(getattr(ENGLISH, s + "s")) for s in SLOTS]
    return [Scene(*combo) for combo in itertools.product(*choices)]


def culture_scenes(captions: SyntheticCaptions) -> tuple[list[tuple[Scene, str]], list[tuple[Scene, str]]]:
    """(training, held out): every (scene, culture caption) of the spec's phrases, split by caption hash."""
    training, heldout = [], []
    for phrase in captions.culture:
        pairs = sorted(((s, culture_caption(s, phrase, captions)) for s in _scenes_of(phrase)),
                       key=lambda pair: hashlib.sha256(pair[1].encode()).hexdigest())
        cut = max(1, len(pairs) // HELD_OUT_SHARE)
        heldout += pairs[:cut]
        training += pairs[cut:]
    return training, heldout


def prompt_lines(language: str, captions: SyntheticCaptions) -> str:
    """The held-out set as `data/prompts/<language>/synthetic-culture.txt` holds it."""
    _, heldout = culture_scenes(captions)
    header = (f"# Held-out culture prompts of the synthetic world for {language} (pea.corpus.culture; regenerate with\n"
              "# `python -m pea.corpus.culture`): `target<TAB>english`, the English being the scene's plain description.\n")
    return header + "".join(f"{target}\t{caption(scene, ENGLISH)}\n" for scene, target in heldout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", nargs="*", default=None, help="default: every shipped language")
    args = parser.parse_args(argv)
    for language in args.languages or available_languages():
        captions = load_spec(language).synthetic_captions
        if captions is None or not captions.culture:
            continue
        path = home() / "data" / "prompts" / language / f"{PROMPT_SET}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(prompt_lines(language, captions), encoding="utf-8")
        print(f"{path}: {len(culture_scenes(captions)[1])} prompts")


if __name__ == "__main__":
    main()
