"""Run by tests/mpm/test_train.py under torchrun: train, then each rank writes a digest of its own weights."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))

from accelerate import PartialState  # noqa: E402

from mpm.core.config import load_config  # noqa: E402
from mpm.recipes.i2t import train  # noqa: E402
from mpm.train_config import TrainConfig  # noqa: E402


def main() -> None:
    cfg = load_config(TrainConfig, sys.argv[1], None, sys.argv[2:])
    result = train(cfg, show_progress=False)
    state = PartialState()
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    latest = sorted((Path(cfg.train.output_dir) / "checkpoints").glob("step-*"))[-1]
    step = json.loads((latest / "state.json").read_text())["step"]
    record = {"world": state.num_processes, "weights": digest.hexdigest(), "step": step}
    (Path(cfg.train.output_dir) / f"rank{state.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
