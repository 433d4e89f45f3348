"""The language rule: captions decided from their scripts get lingua's own verdict, the rest go to lingua."""

import random

import numpy as np
import pyarrow as pa
import pytest

from pea.corpus import langid
from pea.corpus.langid import (
    FAIL,
    LINGUA,
    PASS,
    lingua_verdicts,
    script_decisions,
    wrong_language,
)
from pea.spec import LanguageSpec, load_spec


def _spec(language: str, candidates: list[str] | None = None, base: str | None = None) -> LanguageSpec:
    spec = load_spec(base or language)
    lid = spec.filter.language_id
    if candidates is not None:
        lid = lid.model_copy(update={"candidates": candidates})
    return spec.model_copy(update={"language": language, "filter": spec.filter.model_copy(update={"language_id": lid})})


def _lingua_alone(spec: LanguageSpec, captions: list[str]) -> list[bool]:
    confidence, first = lingua_verdicts(spec, captions)
    return [not f or c < spec.filter.language_id.min_confidence for c, f in zip(confidence, first)]


def _judge(spec: LanguageSpec, captions: list[str]) -> tuple[list[int], list[bool], int]:
    """(script decisions, wrong_language's verdicts, captions lingua judged), after checking the verdicts are
    lingua's own."""
    wrong, judged = wrong_language(spec, pa.array(captions))
    assert wrong.to_pylist() == _lingua_alone(spec, captions)
    return script_decisions(spec, pa.array(captions)).tolist(), wrong.to_pylist(), judged


def test_zh_with_english_candidate() -> None:
    captions = ["红色的圆形", "左边有两个蓝色的正方形。", "a red circle", "logo 红色", "12345", "", "こんにちは"]
    decisions, wrong, judged = _judge(_spec("zh", ["en"]), captions)
    assert decisions == [PASS, PASS, FAIL, LINGUA, LINGUA, LINGUA, LINGUA]
    # mixed: lingua counts two Chinese words against one it cannot place; no letters: lingua gives nothing 1.0
    assert wrong == [False, False, True, False, True, True, True]
    assert judged == 4


def test_zh_shipped_candidates() -> None:
    captions = ["一只猫坐在桌子旁边", "日本の猫", "고양이", "The quick brown fox", "猫 cat cat cat"]
    decisions, wrong, judged = _judge(_spec("zh"), captions)  # candidates en, ja, ko
    assert decisions == [PASS, FAIL, FAIL, FAIL, LINGUA]
    assert wrong == [False, True, True, True, True] and judged == 1


def test_ja_with_chinese_and_english() -> None:
    captions = ["左に赤い丸があります", "ひらがな", "赤い", "红色的圆形", "a red circle", "사람", "ラーメン"]
    decisions, wrong, judged = _judge(_spec("ja"), captions)  # candidates en, zh, ko
    # Han alone is Chinese to lingua (each character a Chinese word); kana with Han is Japanese. 'ー' is a
    # Common-script letter that joins its neighbours into one word: lingua decides.
    assert decisions == [PASS, PASS, PASS, FAIL, FAIL, FAIL, LINGUA]
    assert wrong == [False, False, False, True, True, True, False] and judged == 1


def test_ja_without_chinese() -> None:
    decisions, wrong, _ = _judge(_spec("ja", ["en", "ko"]), ["红色的圆形", "左に赤い丸"])
    # without Chinese among the candidates Han is Japanese's alone; kana with Han may reach lingua's models
    assert decisions == [PASS, LINGUA] and wrong == [False, False]


def test_ko() -> None:
    captions = ["빨간 원", "고양이 두 마리", "大韓民國 사람", "红色", "ひらがな", "red"]
    decisions, wrong, judged = _judge(_spec("ko"), captions)  # candidates en, ja, zh
    # Hangul with Han is weighed word by word: four Han characters outnumber one Hangul word, lingua says Chinese
    assert decisions == [PASS, PASS, LINGUA, FAIL, FAIL, FAIL]
    assert wrong == [False, False, True, True, True, True] and judged == 1


def test_ru() -> None:
    captions = ["красный круг", "red circle", "红色"]
    decisions, wrong, judged = _judge(_spec("ru"), captions)  # candidates en and six Cyrillic neighbours
    assert decisions == [LINGUA, FAIL, LINGUA] and wrong[1:] == [True, True] and judged == 2
    decisions, wrong, judged = _judge(_spec("ru", ["en"]), captions)
    assert decisions == [PASS, FAIL, LINGUA] and wrong == [False, True, True] and judged == 1


def test_latin_target_with_english_goes_to_lingua() -> None:
    captions = ["ein roter Kreis auf der Straße", "a red circle", "红色", "красный круг", ""]
    decisions, wrong, judged = _judge(_spec("de", ["en"], base="it"), captions)
    assert decisions == [LINGUA] * 5 and judged == 5
    assert wrong[:2] == [False, True] and wrong[4]


def test_nulls_and_empty_input() -> None:
    wrong, judged = wrong_language(_spec("zh"), pa.array([None, "红色"], pa.string()))
    assert wrong.to_pylist() == [True, False] and judged == 1
    wrong, judged = wrong_language(_spec("zh"), pa.array([], pa.string()))
    assert len(wrong) == 0 and judged == 0


def test_unknown_candidate_sends_everything_to_lingua(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(langid, "KNOWN", langid.KNOWN - {"KOREAN"})  # as if a newer lingua added it
    assert set(script_decisions(_spec("zh"), pa.array(["红色", "red", "사람"])).tolist()) == {LINGUA}
    with pytest.raises(ValueError, match="does not know the language 'xx'"):
        wrong_language(_spec("zh", ["xx"]), pa.array(["红色"]))


FRAGMENTS = ["红色的", "圆形", "猫", "大韓民國", "〇", "々", "ラーメン", "ひらがな", "カタカナ", "ｶﾀｶﾅ", "사람", "한국어", "㈀",
             "красный", "круг", "їжак", "ђак", "қазақ", "red", "café", "straße", "việt", "Ⅻ", "µ", "αβγ", "๑", "१२", "123",
             "２０２３年", "。", "、", "「", "!", " ", " ", "logo", "e\u0301", "İ", "\u3000", "ǅ", "ß", "ø", "ә", "ѓ"]


@pytest.mark.parametrize("language, candidates, base", [
    ("zh", None, None), ("ja", None, None), ("ko", None, None), ("ru", None, None), ("ko", [], None),
    ("zh", ["en"], None), ("ja", ["en", "ko"], None), ("ru", ["en"], None), ("en", ["zh", "ru", "ja", "ko"], "it")])
def test_script_decisions_equal_lingua(language: str, candidates: list[str] | None, base: str | None) -> None:
    """Every caption decided from its scripts gets lingua's own verdict, over random mixes of scripts and of the
    characters lingua treats specially (Common letters, non-letters of Han/Latin/Indic scripts, marks)."""
    rng = random.Random(0)
    captions = sorted({"".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 4))) for _ in range(3000)})
    spec = _spec(language, candidates, base)
    decisions = script_decisions(spec, pa.array(captions))
    decided = [c for c, d in zip(captions, decisions) if d != LINGUA]
    assert len(decided) > 100
    expected = _lingua_alone(spec, decided)
    assert [d == FAIL for d in decisions[decisions != LINGUA]] == expected
    wrong, judged = wrong_language(spec, pa.array(captions))
    assert judged == int(np.sum(decisions == LINGUA))
    assert np.asarray(wrong)[decisions != LINGUA].tolist() == expected


def test_script_table_knows_every_lingua_language() -> None:
    """A lingua with a language the table lacks still works (everything to lingua, above), but should be noticed."""
    from lingua import Language

    assert {language.name for language in Language.all()} == langid.KNOWN
