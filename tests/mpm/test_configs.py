"""Every shipped image-to-text config loads, names its launch command, and builds a valid MPMConfig."""

from pathlib import Path

import pytest

from mpm.configuration import MPMConfig
from mpm.core.config import load_config
from mpm.train_config import TrainConfig
from mpm.training import mpm_settings
from tests.mpm.conftest import text_config, vision_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "i2t").glob("*.yaml"))


def test_there_are_real_recipes_besides_the_tiny_one():
    names = {p.name for p in CONFIGS}
    assert "tiny.yaml" in names and len(names) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_i2t_config_is_valid(path):
    cfg = load_config(TrainConfig, path)
    assert f"--config configs/i2t/{path.name}" in path.read_text().split("\nmodel:")[0]  # the launch command
    if path.name == "tiny.yaml":
        return  # its parts' folders come from the command line
    cfg.check_required()
    if not cfg.model.init_from:  # a recipe from parts: its settings make a valid MPMConfig
        MPMConfig(vision_config=vision_config("clip"), text_config=text_config("qwen2", 300), **mpm_settings(cfg.model))
