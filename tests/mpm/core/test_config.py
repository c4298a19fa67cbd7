import pytest

from dataproc.sharder import ShardConfig
from mpm.core.config import diff_configs, load_config, save_config
from mpm.core.errors import ConfigError


def test_defaults_then_yaml_then_flags_then_overrides(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("resize:\n  image_size: 128\n  resize_mode: center_crop\nfilters:\n  languages: [en, zh]\n")
    cfg = load_config(ShardConfig, yaml_file, {"resize.image_size": 192}, ["resize.image_size=384"])
    assert cfg.resize.image_size == 384  # override beats flag beats YAML
    assert cfg.resize.resize_mode == "center_crop"  # YAML beats default
    assert cfg.filters.languages == ["en", "zh"]
    assert cfg.output.encode_quality == 95  # default


def test_unknown_key_names_the_key_and_source(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("resize:\n  imagesize: 128\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*resize.imagesize"):
        load_config(ShardConfig, yaml_file)
    with pytest.raises(ConfigError, match=r"override 'filters.bogus=1'.*filters.bogus"):
        load_config(ShardConfig, None, None, ["filters.bogus=1"])


def test_wrong_type_and_bad_values_are_errors():
    with pytest.raises(ConfigError, match="resize.image_size"):
        load_config(ShardConfig, None, None, ["resize.image_size=big"])
    with pytest.raises(ConfigError, match=r"resize.resize_mode.*'stretch'"):
        load_config(ShardConfig, None, None, ["resize.resize_mode=stretch"])
    with pytest.raises(ConfigError, match=r"filters.languages.*english"):
        load_config(ShardConfig, None, None, ["filters.languages=[english]"])
    with pytest.raises(ConfigError, match="invalid regex"):
        load_config(ShardConfig, None, None, ["filters.boilerplate_patterns=['(unclosed']"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(ShardConfig, None, None, ["resize.image_size"])
    with pytest.raises(ConfigError, match=r"save_additional_columns.*\['status'\]"):
        load_config(ShardConfig, None, None, ["input.save_additional_columns=[status]"])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ShardConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("resize: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ShardConfig, bad)


def test_saved_config_round_trips_and_diffs(tmp_path):
    cfg = load_config(ShardConfig, None, {"resize.image_size": 300, "filters.max_aspect_ratio": 3.0})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(ShardConfig, tmp_path / "config.yaml")
    assert again == cfg
    other = load_config(
        ShardConfig, None, {"resize.image_size": 256, "fetch.threads": 3, "filters.max_aspect_ratio": 3.0}
    )
    assert diff_configs(cfg, other, ignore=["fetch"]) == [("resize.image_size", 300, 256)]


def test_a_value_of_the_wrong_shape_names_its_key(tmp_path):
    with pytest.raises(
        ConfigError, match="'filters.languages.0=de': key 'filters.languages' takes a list: give the whole"
    ):
        load_config(ShardConfig, None, None, ["filters.languages.0=de"])
    (tmp_path / "c.yaml").write_text("filters:\n  extra: {name: x}\n")
    with pytest.raises(ConfigError, match="c.yaml: key 'filters.extra' takes a list"):
        load_config(ShardConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"filters.languages.*write \[a, b\], or \[a\] for one item"):
        load_config(ShardConfig, None, None, ["filters.languages=en"])


def test_no_yes_on_off_stay_strings_where_a_string_is_expected(tmp_path):
    from mpm.train_config import TrainConfig

    cfg = load_config(TrainConfig, None, None, ["train.mixed_precision=no", "train.gradient_checkpointing=yes"])
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is True  # a bool key converts
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n  gradient_checkpointing: off\n")
    cfg = load_config(TrainConfig, tmp_path / "c.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is False
    assert load_config(ShardConfig, None, None, ["filters.languages=[en, 'no']"]).filters.languages == ["en", "no"]


def test_untyped_values_keep_their_yaml_types(tmp_path):
    from mpm.core.config import parse_yaml

    assert parse_yaml("a: 1e-3\nb: off\nc: true\nd: [1, 2.5]") == {"a": 0.001, "b": "off", "c": True, "d": [1, 2.5]}
