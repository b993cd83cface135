"""vpotool.config: defaults < YAML < flags, errors that name the flag, YAML round trips, shard specs, field help."""

import dataclasses

import pytest

from vpotool import config as config_module
from vpotool.config import (
    PairConfig,
    SampleConfig,
    ScoreConfig,
    StageConfig,
    build_config,
    doc,
    flag,
    parse_shard,
    save_config,
)
from vpotool.errors import VpoError

REQUIRED = {
    SampleConfig: {"prompts": "prompts.txt", "out": "run"},
    ScoreConfig: {"samples": "run/samples.parquet", "out": "run/scores.parquet"},
    PairConfig: {"samples": "run/samples.parquet", "scores": "run/scores.parquet", "out": "run/pairs.parquet"},
}


def stage_configs() -> list[type]:
    """Every stage config the module defines (so configs added later are checked too)."""
    return [
        c
        for c in vars(config_module).values()
        if isinstance(c, type) and issubclass(c, StageConfig) and c is not StageConfig and dataclasses.is_dataclass(c)
    ]


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_precedence_defaults_yaml_flags(tmp_path):
    path = write_yaml(tmp_path, "prompts: p.txt\nout: run\ncandidates: 6\nsteps: 10\nnoise-level: 0.5\n")
    cfg = build_config(SampleConfig, path, candidates=8, steps=None, guidance=None, seed=None)
    assert cfg.candidates == 8  # flag beats YAML
    assert cfg.steps == 10  # a flag left unset (None) does not override YAML
    assert cfg.noise_level == 0.5  # hyphenated YAML keys are accepted
    assert cfg.seed == 0 and cfg.guidance is None and cfg.batch_size == 8  # defaults
    no_file = build_config(SampleConfig, None, prompts="p.txt", out="run", candidates=2)
    assert no_file == SampleConfig(prompts="p.txt", out="run", candidates=2)


def test_unknown_yaml_key_lists_known_keys(tmp_path):
    path = write_yaml(tmp_path, "prompts: p.txt\nout: run\ncandidate: 4\n")
    with pytest.raises(VpoError) as e:
        build_config(SampleConfig, path)
    msg = one_line(e)
    assert "unknown option(s) candidate;" in msg
    known = msg.split("; known:")[1]
    for f in dataclasses.fields(SampleConfig):
        assert f.name in known


def test_missing_yaml_file(tmp_path):
    with pytest.raises(VpoError, match="config file not found") as e:
        build_config(SampleConfig, str(tmp_path / "nope.yaml"))
    assert "--config" in one_line(e)


@pytest.mark.parametrize("text", ["prompts: [unclosed\n", "- just\n- a list\n"], ids=["invalid", "not-a-mapping"])
def test_bad_yaml(tmp_path, text):
    with pytest.raises(VpoError) as e:
        build_config(SampleConfig, write_yaml(tmp_path, text))
    assert "cfg.yaml" in one_line(e)


@pytest.mark.parametrize(
    "cls, values, name",
    [
        (SampleConfig, {"candidates": 0}, "--candidates"),
        (SampleConfig, {"steps": 0}, "--steps"),
        (SampleConfig, {"noise_level": -0.1}, "--noise-level"),
        (SampleConfig, {"batch_size": 0}, "--batch-size"),
        (SampleConfig, {"crf": 52}, "--crf"),
        (SampleConfig, {"shard": "3/2"}, "--shard"),
        (SampleConfig, {"shard": "x"}, "--shard"),
        (SampleConfig, {"prompts": ""}, "--prompts"),
        (ScoreConfig, {"shard": "1/1"}, "--shard"),
        (ScoreConfig, {"batch_size": -1}, "--batch-size"),
        (PairConfig, {"strategy": "bogus"}, "--strategy"),
        (PairConfig, {"min_margin": -0.5}, "--min-margin"),
        (PairConfig, {"scores": ""}, "--scores"),
    ],
)
def test_invalid_values_name_the_flag(cls, values, name):
    with pytest.raises(VpoError) as e:
        build_config(cls, None, **{**REQUIRED[cls], **values})
    assert one_line(e).startswith(name + " ")


def test_invalid_yaml_value_names_the_flag(tmp_path):
    path = write_yaml(tmp_path, "samples: s.parquet\nscores: c.parquet\nout: p.parquet\nmin-margin: -1\n")
    with pytest.raises(VpoError, match="--min-margin must be >= 0"):
        build_config(PairConfig, path)


def test_mistyped_yaml_value_names_the_flag(tmp_path):
    path = write_yaml(tmp_path, "prompts: p.txt\nout: run\ncandidates: four\n")
    with pytest.raises(VpoError, match="--candidates"):
        build_config(SampleConfig, path)


def test_non_string_shard_in_yaml_is_a_vpo_error(tmp_path):
    path = write_yaml(tmp_path, "prompts: p.txt\nout: run\nshard: 1\n")
    with pytest.raises(VpoError, match="--shard"):
        build_config(SampleConfig, path)


def test_unknown_flag_is_a_vpo_error():
    with pytest.raises(VpoError, match="bogus"):
        build_config(SampleConfig, None, **REQUIRED[SampleConfig], bogus=1)


@pytest.mark.parametrize("cls", [SampleConfig, ScoreConfig, PairConfig])
def test_save_config_round_trips(tmp_path, cls):
    overrides = {
        SampleConfig: {"candidates": 3, "guidance": 4.5, "model_path": "/w/tiny", "shard": "1/4"},
        ScoreConfig: {"reward": "flicker,temporal", "shard": "0/2"},
        PairConfig: {"strategy": "all", "min_margin": 0.25, "reward": "temporal"},
    }[cls]
    cfg = cls(**REQUIRED[cls], **overrides)
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    assert build_config(cls, str(path)) == cfg


@pytest.mark.parametrize("spec, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), ("0/4", (0, 4)), (" 2 / 8 ", (2, 8))])
def test_parse_shard(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["4/4", "-1/4", "0/0", "1", "a/b", "1/2/3", ""])
def test_parse_shard_rejects(spec):
    with pytest.raises(VpoError, match="--shard") as e:
        parse_shard(spec)
    one_line(e)


def test_flag_names():
    assert flag("min_margin") == "--min-margin"
    assert flag("out") == "--out"


def test_every_field_has_help_and_default():
    classes = stage_configs()
    assert {SampleConfig, ScoreConfig, PairConfig} <= set(classes)
    for cls in classes:
        for f in dataclasses.fields(cls):
            where = f"{cls.__name__}.{f.name}"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, where
            help_text = f.metadata.get("help", "")
            assert help_text.strip() and "\n" not in help_text, where
            assert doc(cls, f.name) == help_text


def test_to_dict_holds_every_field():
    cfg = SampleConfig(**REQUIRED[SampleConfig])
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(SampleConfig)}


@pytest.mark.parametrize(
    ("stage", "args", "expect"),
    [
        ("sample", ["--guidance", "nan"], "--guidance must be a finite number"),
        ("sample", ["--guidance", "inf"], "--guidance must be a finite number"),
        ("sample", ["--seed", str(2**70)], "--seed must be in 0..2**63 - 1"),
        ("train-dpo", ["--pairs", "p.parquet", "--seed", "-1"], "--seed must be in 0..2**63 - 1"),
        ("train-dpo", ["--pairs", "p.parquet", "--lr", "nan"], "--lr must be a finite number"),
    ],
)
def test_non_finite_numbers_and_out_of_range_seeds_are_refused(cli, tmp_path, stage, args, expect):
    out = ["--prompts", "world:val"] if stage == "sample" else []
    code, _, err = cli(stage, *out, *args, "--out", tmp_path / "o")
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
