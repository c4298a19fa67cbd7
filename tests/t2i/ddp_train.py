"""Run by tests/t2i/test_recipe.py under torchrun: train, then each rank writes a digest of its own weights."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))

from accelerate import PartialState  # noqa: E402

from mpm.core.config import load_config  # noqa: E402
from t2i.config import T2IConfig  # noqa: E402
from t2i.recipe import train  # noqa: E402


def main() -> None:
    cfg = load_config(T2IConfig, sys.argv[1], None, sys.argv[2:])
    result = train(cfg, show_progress=False)
    state = PartialState()
    digest = hashlib.sha256()
    for module in (result.pipeline.unet, result.pipeline.text_proj):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    record = {"world": state.num_processes, "weights": digest.hexdigest()}
    (Path(cfg.train.output_dir) / f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
