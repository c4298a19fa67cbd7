"""How far transformers' torchvision image processor is from the PIL one (= MPM's pixels) on an exported model.

    python benchmarks/export_pixels.py        # benchmarks/gpu_i2t.sh runs it where torchvision is installed

`mpm export llava` writes the PIL image processor, whose pixels equal MPMProcessor's (tested in the suite, where
torchvision is absent). transformers 5 loads the torchvision one whenever torchvision is installed, whatever the
saved file says; this measures the difference that makes: pixel values (after normalisation) and the logits of
a small random LLaVA, on 16 noise images of assorted sizes resized to 336 px. Needs torch, transformers, Pillow.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoImageProcessor, CLIPVisionConfig, PreTrainedTokenizerFast, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpm.export import export_llava  # noqa: E402
from mpm.modeling import MPMForConditionalGeneration  # noqa: E402


def main() -> None:
    words = {f"w{i}": i for i in range(500)} | {"<pad>": 500, "<eos>": 501, "<unk>": 502}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14)  # fmt: skip
    text = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1)  # fmt: skip
    torch.manual_seed(0)
    model, processor = MPMForConditionalGeneration.from_parts(vision, text, tokenizer=tok, image_size=336)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/mpm")
        processor.save_pretrained(f"{tmp}/mpm")
        export_llava(f"{tmp}/mpm", f"{tmp}/llava")
        pil = AutoImageProcessor.from_pretrained(f"{tmp}/llava", backend="pil")
        fast = AutoImageProcessor.from_pretrained(f"{tmp}/llava", backend="torchvision")
    print(f"processors: {type(pil).__name__} vs {type(fast).__name__}")
    if type(fast) is type(pil):  # transformers falls back to the PIL class without torchvision
        print("torchvision is not installed here: nothing to compare (run on the GPU machine)")
        return
    rng = np.random.default_rng(0)
    pixel_diffs, logit_diffs = [], []
    model.eval()
    for _ in range(16):
        size = (int(rng.integers(200, 900)), int(rng.integers(200, 900)))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        ours = processor.image_inputs(image)[0][0]  # MPMProcessor's pixels
        a = pil(images=[image], return_tensors="pt")["pixel_values"][0]
        b = fast(images=[image], return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(ours, a, atol=1e-5), "the PIL processor should give MPM's pixels exactly"
        pixel_diffs.append((a - b).abs())
        with torch.no_grad():
            la = model.image_tokens(a[None])[0]
            lb = model.image_tokens(b[None])[0]
        logit_diffs.append(((la - lb).abs().max() / la.abs().max()).item())
    diffs = torch.stack([d.flatten() for d in pixel_diffs])
    result = {
        "pixel_abs_diff_mean": diffs.mean().item(),
        "pixel_abs_diff_max": diffs.max().item(),
        "in_8bit_levels_mean": (diffs.mean() * 255 * 0.27).item(),  # normalised units x std x 255
        "visual_token_rel_diff_max": max(logit_diffs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
