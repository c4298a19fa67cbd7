"""Every shipped `mpm unimm` config loads."""

from pathlib import Path

import pytest

from mpm.core.config import load_config

UNIMM_CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "unimm").glob("*.yaml"))


@pytest.mark.parametrize("path", UNIMM_CONFIGS, ids=[p.name for p in UNIMM_CONFIGS])
def test_every_shipped_unimm_config_loads(path):
    from unimm_chat.config import BuildConfig, TranslateConfig

    schema = TranslateConfig if path.name.startswith("translate") else BuildConfig
    assert load_config(schema, path) is not None
