import pytest
import torch


@pytest.fixture
def save_tiny(tiny, tmp_path):
    """save_tiny(name, seed=0) -> a folder holding a tiny MPM model (random weights from `seed`) and its processor."""

    def save(name: str, seed: int = 0):
        torch.manual_seed(seed)
        model, processor = tiny()
        folder = tmp_path / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    return save
