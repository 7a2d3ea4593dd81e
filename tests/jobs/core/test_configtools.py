from dataclasses import dataclass, field
from typing import Literal

import pytest

from vitpipe.jobs.core.configtools import ConfigError, apply_overrides, config_hash, from_dict, to_dict


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    shots: tuple[int, ...] = (1, 5)
    mode: Literal["a", "b"] = "a"
    limit: int | None = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@dataclass(kw_only=True)
class Outer:
    name: str = "x"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_each_type():
    cfg = apply_overrides(Outer(), ["inner.lr=3e-4", "inner.shots=1,10,25", "flag=true", "name=abc",
                                    "inner.mode=b", "inner.limit=7"])
    assert cfg.inner.lr == 3e-4 and cfg.inner.shots == (1, 10, 25) and cfg.flag is True
    assert cfg.name == "abc" and cfg.inner.mode == "b" and cfg.inner.limit == 7
    assert apply_overrides(cfg, ["inner.limit=none"]).inner.limit is None
    assert Outer().inner.lr == 1e-3  # the original is untouched


@pytest.mark.parametrize("override, message", [
    ("inner.lrr=1", "unknown config key 'inner.lrr'"),
    ("nope=1", "unknown config key 'nope'"),
    ("inner.lr=abc", "'inner.lr' expects a number"),
    ("inner.mode=c", "'inner.mode' must be one of"),
    ("inner.shots=1,x", "'inner.shots' expects an integer"),
    ("inner.lr=-1", "invalid value for 'inner.lr': lr must be > 0"),
    ("inner=3", "'inner' is a section"),
    ("flag", "bad override 'flag'"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Outer(), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_dict_round_trip_and_hash():
    cfg = apply_overrides(Outer(), ["inner.shots=2,3"])
    d = to_dict(cfg)
    back = from_dict(Outer, d)
    assert back == cfg
    assert config_hash(back) == config_hash(cfg)
    assert config_hash(apply_overrides(cfg, ["inner.lr=0.5"])) != config_hash(cfg)
    with pytest.raises(ConfigError, match="unknown config key 'inner.bogus'"):
        from_dict(Outer, {"inner": {"bogus": 1}})


def test_pipeline_config_overrides_reach_component_configs():
    from vitpipe.jobs.config.recipes import get_recipe

    cfg = apply_overrides(get_recipe("demo"), ["model.depth=3", "pretrain.stream.rrc_scale=0.5,1.0",
                                               "fewshot.probe.shots=1,2", "model=S/4"])
    assert cfg.model.width == 384  # model=NAME rebuilds the section from the variant table
    cfg = apply_overrides(get_recipe("demo"), ["model.depth=3", "pretrain.stream.rrc_scale=0.5,1.0"])
    assert cfg.model.depth == 3 and cfg.pretrain.stream.rrc_scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        get_recipe("nope")
    with pytest.raises(ConfigError, match="pretrain.zero_stage"):
        apply_overrides(get_recipe("demo"), ["pretrain.zero_stage=5"])


def test_dataset_normalisation_needs_a_plain_patch_embedding():
    from vitpipe.jobs.config.recipes import get_recipe

    cfg = apply_overrides(get_recipe("demo"), ["pretrain.stream.mean=0.49,0.48,0.45", "model.init=torch"])
    assert cfg.pretrain.stream.mean == (0.49, 0.48, 0.45) and cfg.model.init == "torch"
    with pytest.raises(ConfigError, match="hybrid ResNet stem cannot take exactly"):
        apply_overrides(get_recipe("demo"), ["pretrain.stream.mean=0.49,0.48,0.45", "model=R50+B/16"])


def test_secrets_are_redacted_but_not_lookalikes():
    from vitpipe.jobs.core.tracking import flatten, redact_tree

    flat = flatten({"model": {"class_token": True}, "s3": {"secret_key": "abc", "auth_token": "t"},
                    "tracking": {"uri": "postgresql://user:hunter2@db/mlflow"}})
    assert flat["model.class_token"] is True
    assert flat["s3.secret_key"] == "***" and flat["s3.auth_token"] == "***"
    assert flat["tracking.uri"] == "postgresql://user:***@db/mlflow"
    assert "hunter2" not in str(redact_tree({"a": ["http://u:hunter2@x"]}))
