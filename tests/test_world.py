"""The toy world's web-like noise and culture phrases (#19): the shares are what the spec says, the culture
phrases live only in native captions, and their held-out prompt sets are what pea.corpus.culture derives."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pea import ops
from pea.corpus.culture import PROMPT_SET, prompt_lines
from pea.corpus.synthetic import (
    ENGLISH,
    Scene,
    all_scenes,
    caption,
    culture_caption,
    culture_scenes,
    make_corpus,
    word_by_word,
)
from pea.evaluate import load_prompts
from pea.models import toy
from pea.spec import CulturePhrase, available_languages, home, load_spec

SIZE, CULTURE = 180, 42


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    spec = ops.with_overrides(load_spec("zh", "embedded,toy"), corpus={"synthetic": {
        "size": SIZE, "mismatched": 0.3, "partial": 0.2, "culture_rows": CULTURE}})
    folder = tmp_path_factory.mktemp("noisy")
    table = pq.read_table(make_corpus(spec, folder)).to_pandas()
    good = table[table.url.str.startswith("images/0") | table.url.str.startswith("images/culture-")]
    return spec, folder, good.drop_duplicates("url")


def _read(folder: Path, urls) -> list[Scene]:
    """What the shipped judge sees in each image (it reads 1.000 of held-out renders right)."""
    judge = toy.Judge.load()
    images = [Image.open(folder / url).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS) for url in urls]
    read = judge.read(toy.to_tensor(images))
    return [Scene(*(toy.ATTRIBUTES[a][int(i)] for a, i in zip(toy.ATTRIBUTES, row))) for row in read]


def test_the_mismatched_share_is_the_specs_and_the_english_stays_a_faithful_translation(noisy):
    spec, folder, rows = noisy
    pairs = rows[~rows.native]
    assert len(pairs) == SIZE
    scenes = all_scenes()
    named = [scenes[i % len(scenes)] for i in range(SIZE)]  # the scene each caption names
    drawn = _read(folder, pairs.url)
    assert sum(d != n for d, n in zip(drawn, named)) == round(0.3 * SIZE)
    for scene, (_, row) in zip(named, pairs.iterrows()):  # both captions name the same scene, whatever the image
        assert row.caption_en in (caption(scene, ENGLISH), caption(scene, ENGLISH, partial=True))
        partial = row.caption_en == caption(scene, ENGLISH, partial=True)
        assert row.caption_zh == caption(scene, spec.synthetic_captions, partial)
    native = rows[rows.native]
    culture_drawn = _read(folder, native.url)
    training = dict((text, scene) for scene, text in culture_scenes(spec.synthetic_captions)[0])
    assert sum(d != training[t] for d, t in zip(culture_drawn, native.caption_zh)) == round(0.3 * CULTURE)


def test_native_rows_take_their_own_share_when_the_spec_gives_one(tmp_path):
    spec = ops.with_overrides(load_spec("zh", "embedded,toy"), corpus={"synthetic": {
        "size": 60, "mismatched": 0.3, "culture_rows": CULTURE, "native_mismatched": 0.0}})
    table = pq.read_table(make_corpus(spec, tmp_path)).to_pandas()
    native = table[table.native]
    training = dict((text, scene) for scene, text in culture_scenes(spec.synthetic_captions)[0])
    assert _read(tmp_path, native.url) == [training[t] for t in native.caption_zh]  # every native image right
    pairs = table[~table.native & table.url.str.startswith("images/0")].drop_duplicates("url")  # less BROKEN's copy
    scenes = all_scenes()
    assert sum(d != scenes[i % len(scenes)] for i, d in enumerate(_read(tmp_path, pairs.url))) == round(0.3 * 60)


def test_the_partial_share_leaves_the_position_out_of_both_captions(noisy):
    spec, _, rows = noisy
    pairs = rows[~rows.native]
    partial = pairs[~pairs.caption_en.map(toy.is_scene)]
    assert len(partial) == round(0.2 * SIZE)
    positions = list(ENGLISH.positions.values()) + list(spec.synthetic_captions.positions.values())
    assert not any(p in text for p in positions for text in [*partial.caption_en, *partial.caption_zh])


def test_culture_phrases_appear_only_in_native_captions_and_never_in_english(noisy):
    spec, _, rows = noisy
    phrases = [p.phrase for p in spec.synthetic_captions.culture]
    native = rows[rows.native]
    assert len(native) == CULTURE and (native.caption_en == "").all()
    assert all(any(p in text for p in phrases) for text in native.caption_zh)
    parallel = rows[~rows.native]
    assert not any(p in text for p in phrases for text in [*parallel.caption_en, *parallel.caption_zh])
    heldout = {target for target, _ in load_prompts("zh", PROMPT_SET)}
    assert heldout and not heldout & set(native.caption_zh)  # the prompt set is held out


def test_the_clean_world_has_no_noise_and_no_native_rows(tmp_path):
    spec = ops.with_overrides(load_spec("zh", "embedded"), corpus={"synthetic": {"size": 30}})
    assert (spec.corpus.synthetic.mismatched, spec.corpus.synthetic.partial, spec.corpus.synthetic.culture_rows) == (0, 0, 0)
    table = pq.read_table(make_corpus(spec, tmp_path)).to_pandas()
    good = table[table.url.str.startswith("images/0")].drop_duplicates("url")
    assert not table.native.any()
    assert _read(tmp_path, good.url) == [all_scenes()[i] for i in range(30)]


@pytest.mark.parametrize("language", available_languages())
def test_every_language_ships_its_held_out_culture_prompts(language):
    captions = load_spec(language).synthetic_captions
    assert len(captions.culture) >= 3
    path = home() / "data" / "prompts" / language / f"{PROMPT_SET}.txt"
    assert path.read_text(encoding="utf-8") == prompt_lines(language, captions), "run python -m pea.corpus.culture"
    training, heldout = culture_scenes(captions)
    assert not {t for _, t in training} & {t for _, t in heldout}
    for target, english in load_prompts(language, PROMPT_SET):
        assert toy.is_scene(english)  # the judge can score it; the teacher is given it
        # The dictionary does not know the phrase: it cannot say the colour the phrase means.
        assert ENGLISH.colors[toy.scene_of(english).color] not in word_by_word(target, captions)
    assert not any(p.phrase in caption(s, captions) for p in captions.culture for s in all_scenes())


def test_a_culture_phrase_is_refused_unless_its_template_fits():
    with pytest.raises(ValueError, match="must hold the phrase"):
        CulturePhrase(phrase="红日", means={"color": "red", "shape": "circle"}, template="{position}{count}")
    phrase = CulturePhrase(phrase="红日", means={"color": "red", "shape": "circle"})
    captions = load_spec("zh").synthetic_captions
    assert culture_caption(Scene("two", "red", "circle", "left"), phrase, captions) == "左边有两个红日"
    with pytest.raises(ValueError, match="means color red"):
        culture_caption(Scene("two", "blue", "circle", "left"), phrase, captions)
    spec = load_spec("zh", "embedded,toy")
    bad = spec.synthetic_captions.model_copy(update={"culture": [phrase.model_copy(update={"means": {"color": "pink"}})]})
    with pytest.raises(ValueError, match="means color 'pink'"):
        make_corpus(spec.model_copy(update={"synthetic_captions": bad}), Path("/nonexistent"))
