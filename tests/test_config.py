from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional

import pytest

from soho.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from soho.models.config import EncoderConfig, SohoConfig


@dataclass
class Inner:
    size: int = 3
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    path: Optional[str] = None
    sizes: List[int] = field(default_factory=lambda: [1, 2])
    flag: bool = False


def test_round_trip_and_int_to_float():
    config = from_dict(Outer, {"inner": {"rate": 1, "mode": "b"}, "sizes": [4], "path": "p"})
    assert config.inner.rate == 1.0 and isinstance(config.inner.rate, float)
    assert config.inner.mode == "b" and config.sizes == [4] and config.path == "p"
    assert from_dict(Outer, to_dict(config)) == config


@pytest.mark.parametrize("data, message", [
    ({"inner": {"sise": 3}}, "inner.sise"),
    ({"nmae": "y"}, "nmae"),
    ({"inner": {"size": "3"}}, "inner.size: expected int"),
    ({"inner": {"size": 3.5}}, "inner.size: expected int"),
    ({"flag": 1}, "flag: expected bool"),
    ({"inner": {"mode": "c"}}, "inner.mode: expected one of 'a', 'b'"),
    ({"sizes": [1, "x"]}, r"sizes\[1\]"),
    ({"inner": 5}, "inner: expected a mapping"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_overrides_parse_yaml_values():
    data = apply_overrides({"inner": {"size": 1}}, ["inner.size=7", "inner.rate=1e-4", "flag=true",
                                                    "name=resnet10t", "path=null"])
    config = from_dict(Outer, data)
    assert config.inner.size == 7 and config.inner.rate == pytest.approx(1e-4)
    assert config.flag is True and config.name == "resnet10t" and config.path is None


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["inner.size"])


def test_hidden_size_must_divide_by_heads():
    with pytest.raises(ConfigError, match="divisible"):
        EncoderConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ConfigError, match="divisible"):
        from_dict(SohoConfig, {"encoder": {"hidden_size": 64, "num_attention_heads": 5}})


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="itc.enabled"):
        from_dict(SohoConfig, {"itm": {"hard_negatives": True}})
    with pytest.raises(ConfigError, match="visual dictionary"):
        from_dict(SohoConfig, {"use_visual_dictionary": False})


def test_yaml_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("encoder:\n  hidden_size: 64\n  num_attention_heads: 4\nvisual_dictionary:\n  size: 16\n")
    config = load_config(SohoConfig, path, ["encoder.num_hidden_layers=2"])
    assert config.encoder.hidden_size == 64 and config.encoder.num_hidden_layers == 2
    assert config.visual_dictionary.size == 16
    with pytest.raises(ConfigError, match="not found"):
        load_config(SohoConfig, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("encoder: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SohoConfig, tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*/*.yaml")
                                        if p.parent.name in ("pretrain", "finetune")))
def test_shipped_configs_validate(path):
    from soho.tasks import load_run_config
    config = load_run_config(path, default_task="pretraining")
    assert config.train.output_dir.startswith("runs/")
    assert (config.task == "pretraining") == ("/pretrain/" in path)


def test_nested_check_names_the_key_from_the_root_once():
    from soho.tasks import PretrainConfig
    with pytest.raises(ConfigError, match=r"^model\.encoder\.hidden_size \(30\) must be divisible"):
        from_dict(PretrainConfig, {"model": {"encoder": {"hidden_size": 30, "num_attention_heads": 4}}})


@pytest.mark.parametrize("missing", ["shards", "tokenizer"])
def test_pretraining_needs_its_data_named(missing):
    from soho.tasks import PretrainConfig
    data = {"shards": "data/synthetic/pretrain", "tokenizer": "data/synthetic/tokenizer"}
    assert from_dict(PretrainConfig, {"data": data}).data.eval_shards == {}  # held-out evaluation is opt-in
    del data[missing]
    with pytest.raises(ConfigError, match=f"^data.{missing} is required"):
        from_dict(PretrainConfig, {"data": data})


@pytest.mark.parametrize("missing, message", [
    ("init.checkpoint", "init.checkpoint is required"), ("data.train_shards", "data.train_shards is required"),
    ("data.eval_shards", "data.eval_shards needs at least one split")])
def test_fine_tuning_needs_its_checkpoint_and_data_named(missing, message):
    from soho.tasks import FinetuneConfig
    data = {"init": {"checkpoint": "runs/synthetic/pretrained"},
            "data": {"train_shards": "data/synthetic/ve_train", "eval_shards": {"val": "data/synthetic/ve_val"}}}
    section, key = missing.split(".")
    del data[section][key]
    with pytest.raises(ConfigError, match=f"^{message}"):
        from_dict(FinetuneConfig, data)


@pytest.mark.parametrize("path", sorted(map(str, (Path(__file__).parents[1] / "configs" / "transfer").glob("*.yaml"))))
def test_shipped_transfer_studies_validate(path):
    from soho.train.transfer import load_transfer, run_config
    study = load_transfer(path)
    for task in study.tasks:
        for start in study.start_names():
            run_config(study, task, start, study.seeds[0], Path("runs/check"))


@pytest.mark.parametrize("override, message", [
    ("optim.rest.lr=.nan", "optim.rest.lr: expected a finite number, got nan"),
    ("optim.rest.lr=1e999", "optim.rest.lr: expected a finite number, got inf"),
    ("optim.backbone.lr=-.inf", "optim.backbone.lr: expected a finite number, got -inf"),
    ("optim.rest.lr=1e6", r"optim.rest.lr must be in \(0, 10\], got 1000000.0"),
    ("optim.rest.betas=[0.9, 1.5]", r"optim.rest.betas must be in \[0, 1\)"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("train.max_minutes=.inf", "train.max_minutes: expected float or null, got inf"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be >= 1"),
])
def test_non_finite_and_absurd_hyper_parameters_fail_validation(override, message):
    from soho.tasks import load_run_config
    data = ["data.shards=data/synthetic/pretrain", "data.tokenizer=data/synthetic/tokenizer"]
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_run_config(None, [*data, override], default_task="pretraining")


def test_configs_built_in_code_refuse_nan_too():
    from soho.train.config import OptimizerConfig
    with pytest.raises(ConfigError, match="lr must be in"):
        OptimizerConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="expected a finite number"):
        from_dict(Outer, {"inner": {"rate": 10 ** 400}})
