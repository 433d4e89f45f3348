from pathlib import Path

import pytest
import yaml

from pea import ops
from pea.spec import SpecError, available_languages, load_spec

DATA = Path(__file__).resolve().parents[1] / "data"


def _write(tmp_path: Path, language: str, spec: dict) -> Path:
    (tmp_path / "languages").mkdir(exist_ok=True)
    (tmp_path / "languages" / f"{language}.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    return tmp_path


def _zh() -> dict:
    return yaml.safe_load((DATA / "languages" / "zh.yaml").read_text())


def test_shipped_specs_load_with_and_without_the_embedded_profile(tmp_path):
    assert {"zh", "ja"} <= set(available_languages())
    for language in ("zh", "ja"):
        real = load_spec(language)
        assert real.language == language and real.caption_column == f"caption_{language}"
        assert real.corpus.synthetic is None and real.train.lr == 1e-5
        tiny = load_spec(language, profile="embedded", zoo_dir=tmp_path)
        assert tiny.student.id == str(tmp_path.resolve() / f"student-{language}")
        assert tiny.corpus.synthetic is not None and tiny.corpus.manifests == []
        assert tiny.synthetic_captions == real.synthetic_captions  # the profile keeps what it doesn't name


def test_unknown_key_is_refused_naming_the_field(tmp_path):
    spec = _zh()
    spec["train"]["stepz"] = 10
    with pytest.raises(SpecError, match=r"train\.stepz: unknown field"):
        load_spec("zh", data_dir=_write(tmp_path, "zh", spec))


def test_missing_field_is_refused_naming_the_field(tmp_path):
    spec = _zh()
    del spec["student"]["id"]
    with pytest.raises(SpecError, match=r"student\.id: required field is missing"):
        load_spec("zh", data_dir=_write(tmp_path, "zh", spec))


@pytest.mark.parametrize("code", ["../x", "zh/../../etc", "", "ZH", "toolongcode", "zh_CN", "zh-"])
def test_bad_language_codes_are_refused(code):
    with pytest.raises(SpecError, match="BCP-47"):
        load_spec(code)


def test_language_field_must_match_the_file_and_unknown_languages_name_the_known_ones(tmp_path):
    with pytest.raises(SpecError, match=r"known languages: .*ja.*zh"):
        load_spec("xx")
    spec = _zh()
    spec["language"] = "ja"
    with pytest.raises(SpecError, match="named zh.yaml"):
        load_spec("zh", data_dir=_write(tmp_path, "zh", spec))


def test_bad_values_are_refused_naming_the_field(tmp_path):
    spec = _zh()
    spec["train"]["precision"] = "fp8"
    spec["synthetic_captions"]["template"] = "{color}{shape}"
    with pytest.raises(SpecError) as err:
        load_spec("zh", data_dir=_write(tmp_path, "zh", spec))
    assert "train.precision" in str(err.value) and "synthetic_captions" in str(err.value)


def test_the_default_is_plug_and_play_and_the_paper_is_one_profile_away(zoo_dir):
    default = load_spec("zh", "embedded", zoo_dir=zoo_dir).train
    assert (default.adapter_tokens, default.token_mixer, default.token_kd_weight) == ("teacher", "attention", 10.0)
    assert default.perturbation.share == 0.5 and default.token_warmup > 0
    assert default.total_steps == default.steps + default.fitting_steps
    assert default.heads_for(64) == 8 and default.heads_for(768) == 12 and default.heads_for(2048) == 32
    for shipped in available_languages():  # the paper's adapter stacks on every spec and the embedded profile
        paper = load_spec(shipped, "embedded,toy,paper", zoo_dir=zoo_dir).train
        assert (paper.adapter_tokens, paper.token_kd_weight, paper.token_warmup, paper.perturbation.share) == \
            ("student", 0.0, 0.0, 0.0)
        assert paper.total_steps == paper.steps


def test_the_diffusion_only_baseline_reads_nothing_of_the_teacher(zoo_dir):
    from pea.spec import DIFFUSION_ONLY

    default = load_spec("zh", "embedded,toy", zoo_dir=zoo_dir)
    with pytest.raises(SpecError, match="diffusion_loss: all .* token_kd_weight, token_warmup or perturbation.share"):
        ops.with_overrides(default, train={"diffusion_loss": "all"})  # the default's warm start would fit the teacher
    for shipped in available_languages():
        baseline = ops.with_overrides(load_spec(shipped, "embedded,toy", zoo_dir=zoo_dir), train=DIFFUSION_ONLY).train
        assert (baseline.token_kd_weight, baseline.fitting_steps, baseline.perturbation.share) == (0.0, 0, 0.0)
        assert baseline.adapter_tokens == default.train.adapter_tokens  # the default's adapter, by the images alone


def test_the_token_terms_need_the_teachers_token_count(zoo_dir):
    paper = load_spec("zh", "embedded,paper", zoo_dir=zoo_dir)
    with pytest.raises(SpecError, match="adapter_tokens: teacher"):
        ops.with_overrides(paper, train={"token_kd_weight": 1.0})
    with pytest.raises(SpecError, match="token_warmup.*adapter_tokens: teacher"):
        ops.with_overrides(paper, train={"token_warmup": 1.0})
    spec = ops.with_overrides(paper, train={"token_kd_weight": 1.0, "adapter_tokens": "teacher"})
    assert spec.train.token_kd_weight == 1.0
    with pytest.raises(SpecError, match="token_mixer: attention.*adapter_tokens: teacher"):
        ops.with_overrides(paper, train={"token_mixer": "attention"})
    assert ops.with_overrides(spec, train={"token_mixer": "attention"}).train.token_mixer == "attention"
    with pytest.raises(SpecError, match="mixer_heads.*set token_mixer: attention"):
        ops.with_overrides(spec, train={"mixer_heads": 8})


def test_embed_refuses_no_ssh_across_nodes_and_keeps_the_other_runners(zh_spec):
    layout = {"num_gpus": 1, "num_nodes": 2, "hostfile": "/etc/hosts", "master_addr": "10.0.0.1"}
    with pytest.raises(SpecError, match=r"embed.*no_ssh is not supported.*pdsh"):
        ops.with_overrides(zh_spec, embed={"launcher": {**layout, "multinode_runner": "no_ssh"}})
    assert ops.with_overrides(zh_spec, embed={"launcher": layout}).embed.launcher.num_nodes == 2
    trained = ops.with_overrides(zh_spec, train={"launcher": {**layout, "multinode_runner": "no_ssh"}})
    assert trained.train.launcher.multinode_runner == "no_ssh"  # training under no_ssh is supported (test_train)
