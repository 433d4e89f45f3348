"""The held-out culture prompt set of the synthetic world (its phrases' scenes: pea.corpus.synthetic).

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

from pea.corpus.synthetic import ENGLISH, caption, culture_scenes
from pea.spec import SyntheticCaptions, available_languages, home, load_spec

PROMPT_SET = "synthetic-culture"
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
