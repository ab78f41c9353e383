"""Config: recipes load, overrides are type-checked, unknown keys and bad values name the key."""

from pathlib import Path

import pytest

from tf_charrnn.config import (CONFIGS_DIR, Config, apply_overrides, config_from_dict,
                               load_config, parse_override, recipe_path, save_config)
from tf_charrnn.errors import UsageError

RECIPES = sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))


def test_the_documented_recipes_exist():
    assert {"linux_kernel", "lecture", "shakespeare", "min_char_rnn", "korean"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_and_validates(name):
    config = load_config(recipe_path(name))
    assert isinstance(config, Config)


def test_lecture_recipe_has_the_lecture_settings():
    config = load_config(recipe_path("lecture"))
    assert (config.model.cell, config.model.num_layers, config.model.hidden_size) == ("lstm", 2, 128)
    assert (config.data.batch_size, config.data.seq_length) == (50, 50)
    assert (config.train.optimizer, config.train.learning_rate) == ("adam", 0.002)
    assert (config.train.decay_rate, config.train.clip, config.train.clip_threshold) == \
        (0.97, "global_norm", 5.0)


def test_min_char_rnn_recipe_is_the_numpy_original():
    config = load_config(recipe_path("min_char_rnn"))
    assert (config.model.cell, config.model.one_hot, config.model.hidden_size) == ("rnn", True, 100)
    assert (config.data.batch_size, config.data.seq_length) == (1, 25)
    assert (config.train.optimizer, config.train.learning_rate) == ("adagrad", 0.1)
    assert (config.train.clip, config.train.clip_threshold) == ("value", 5.0)
    assert config.train.loss_reduction == "sum_over_time"


def test_save_and_load_round_trip(tmp_path):
    config = apply_overrides(Config(), [("model", "cell", "gru"), ("train", "max_steps", 7)])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_overrides_are_parsed_as_yaml_and_type_checked():
    assert parse_override("train.learning_rate=0.5") == ("train", "learning_rate", 0.5)
    config = apply_overrides(Config(), [parse_override("train.learning_rate=1e-3"),
                                        parse_override("data.hangul_jamo=true"),
                                        parse_override("train.max_steps=none")])
    assert config.train.learning_rate == 0.001 and config.data.hangul_jamo is True
    assert config.train.max_steps is None
    assert apply_overrides(Config(), [("train", "learning_rate", 1)]).train.learning_rate == 1.0


@pytest.mark.parametrize("values, message", [
    ({"model": {"hiden_size": 3}}, "unknown config key 'model.hiden_size'"),
    ({"modle": {}}, "unknown config section 'modle'"),
    ({"train": {"epochs": 1.5}}, "train.epochs must be int, got 1.5"),
    ({"train": {"epochs": True}}, "train.epochs must be int, got True"),
    ({"data": {"hangul_jamo": "yes"}}, "data.hangul_jamo must be bool"),
    ({"data": {"val_fraction": 1.0}}, r"data.val_fraction must be in \[0, 1\)"),
    ({"train": {"optimizer": "lion"}}, "train.optimizer must be one of adam, rmsprop"),
    ({"train": {"clip": "norm"}}, "train.clip must be one of global_norm, value, none"),
    ({"train": {"strategy": "tpu"}}, "train.strategy must be one of auto"),
    ({"sample": {"temperature": 0}}, "sample.temperature must be > 0"),
    ({"sample": {"top_p": 1.5}}, r"sample.top_p must be in \(0, 1\]"),
    ({"data": "big"}, "config section 'data' must be a mapping"),
])
def test_bad_values_fail_naming_the_key(values, message):
    with pytest.raises(UsageError, match=message):
        config_from_dict(values)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  cell: [lstm\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"bad.yaml is not valid YAML at line \d"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(UsageError, match="config file nowhere.yaml not found"):
        load_config(Path("nowhere.yaml"))


def test_every_override_is_type_checked_even_one_a_later_one_replaces():
    """`--set model.hidden_size=[1,2] --hidden-size 16`: the flag wins, but the typo is named."""
    with pytest.raises(UsageError, match=r"model.hidden_size must be int, got \[1, 2\]"):
        apply_overrides(Config(), [("model", "hidden_size", [1, 2]),
                                   ("model", "hidden_size", 16)])


@pytest.mark.parametrize("section, field", [("train", "runs_dir"), ("data", "data_dir"),
                                            ("data", "corpus")])
def test_empty_paths_are_refused(section, field):
    with pytest.raises(UsageError, match=f"{section}.{field} must not be empty"):
        apply_overrides(Config(), [(section, field, " ")])


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "learning_rate", float("inf"), "train.learning_rate must be positive and finite"),
    ("train", "clip_threshold", float("inf"), "train.clip_threshold must be positive and finite"),
])
def test_infinite_rates_are_refused(section, field, value, message):
    with pytest.raises(UsageError, match=message):
        apply_overrides(Config(), [(section, field, value)])


@pytest.mark.parametrize("value", [16.5, True])
def test_a_model_size_must_be_an_integer(value):
    import dataclasses

    from tf_charrnn.config import ModelConfig, validate_model

    with pytest.raises(UsageError, match=f"model.hidden_size must be an integer, got {value!r}"):
        validate_model(dataclasses.replace(ModelConfig(), hidden_size=value))


def test_a_floor_above_the_rate_is_refused():
    with pytest.raises(UsageError, match=r"train.min_learning_rate must be in \[0, "
                                         r"train.learning_rate\], got 0.5"):
        apply_overrides(Config(), [("train", "min_learning_rate", 0.5)])
