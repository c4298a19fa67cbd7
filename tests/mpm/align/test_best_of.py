"""Best-of-N with DPO's implicit reward, through `mpm chat --best-of`."""

import pytest
from PIL import Image

from mpm.align.best_of import answer_logps, best_of_n
from mpm.cli import main
from mpm.core.images import open_image
from mpm.inference import load_model


@pytest.fixture
def models(save_tiny, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    return save_tiny("policy", seed=0), save_tiny("reference", seed=1), image  # they differ


def test_the_kept_answer_has_the_highest_implicit_reward(models):
    policy_dir, reference_dir, image = models
    policy, processor = load_model(policy_dir, device="cpu")
    reference, _ = load_model(reference_dir, device="cpu")
    best, candidates = best_of_n(policy, reference, processor, "What is this?", [str(image)], n=4, beta=0.5,
                                 max_new_tokens=6, temperature=1.0)  # fmt: skip
    assert len(candidates) == 4 and len({c.answer for c in candidates}) > 1  # sampled, not four greedy copies
    assert best.reward == max(c.reward for c in candidates)
    scored = [c for c in candidates if c.answer.strip()]
    images = [open_image(image)]
    by_hand = 0.5 * (answer_logps(policy, processor, "What is this?", images, [scored[0].answer])
                     - answer_logps(reference, processor, "What is this?", images, [scored[0].answer]))  # fmt: skip
    assert scored[0].reward == pytest.approx(float(by_hand[0]), abs=1e-4)
    again, _ = best_of_n(policy, reference, processor, "What is this?", [str(image)], n=4, beta=0.5,
                         max_new_tokens=6, temperature=1.0)  # fmt: skip
    assert again == best  # one seed: the same samples


def test_chat_best_of_prints_the_candidates_and_the_answer(models, capsys):
    policy_dir, reference_dir, image = models
    argv = ["chat", "--model", str(policy_dir), "--image", str(image), "--best-of", "3", "--max-new-tokens", "5",
            "--device", "cpu", "What is this?"]  # fmt: skip
    assert main([*argv, "--reference", str(reference_dir)]) == 0
    out = capsys.readouterr()
    assert out.err.count("reward") == 3 and out.err.count("<- kept") == 1
    kept = out.err.split("<- kept: ", 1)[1]  # (random tokens may hold control characters: no splitlines)
    assert kept.startswith(out.out.rstrip("\n"))
    assert main(argv) == 2
    assert "give --reference DIR" in capsys.readouterr().err
