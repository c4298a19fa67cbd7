"""Every shipped `mpm data shard` config loads."""

from pathlib import Path

import pytest

from dataproc.sharder import ShardConfig
from mpm.core.config import load_config

CONFIGS = sorted((Path(__file__).parents[3] / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_data_config_loads(path):
    cfg = load_config(ShardConfig, path)
    assert cfg.resize.image_size > 0
