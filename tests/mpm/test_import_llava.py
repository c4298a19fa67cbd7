"""`import_llava`: a LLaVA checkpoint back into an MPM one (the inverse of `export_llava`)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mpm.core.errors import ExportError
from mpm.export import export_llava, import_llava
from mpm.inference import Request, generate, load_model
from mpm.modeling import MPMForConditionalGeneration
from mpm.processor import MPMProcessor
from tests.mpm.conftest import make_tokenizer

NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8), "RGB")
MESSAGES = [{"role": "user", "content": "<image>\nWhat is this?"}]


@pytest.fixture
def exported(tiny, tmp_path):
    """(MPM folder, its LLaVA export) of a tiny model."""

    def export(**kwargs):
        torch.manual_seed(0)
        model, processor = tiny(**kwargs)
        model.save_pretrained(tmp_path / "mpm")
        processor.save_pretrained(tmp_path / "mpm")
        return tmp_path / "mpm", export_llava(tmp_path / "mpm", tmp_path / "llava")

    return export


@pytest.mark.parametrize(
    ("vision", "chat_template", "select"),
    [("clip", True, "patch"), ("clip", False, "full"), ("siglip", True, "patch")],
    ids=["clip", "plain-full", "siglip"],
)
def test_mpm_llava_mpm_round_trip(exported, tmp_path, vision, chat_template, select):
    source, llava_dir = exported(
        vision=vision, tokenizer=make_tokenizer(chat_template=chat_template), vision_feature_select=select
    )
    out = import_llava(llava_dir, tmp_path / "back")
    model, processor = load_model(source, device="cpu")
    back, back_processor = load_model(out, device="cpu")
    assert isinstance(back, MPMForConditionalGeneration) and isinstance(back_processor, MPMProcessor)
    # also readable piece by piece
    assert isinstance(MPMForConditionalGeneration.from_pretrained(out), MPMForConditionalGeneration)
    assert MPMProcessor.from_pretrained(out).config.image_token_id == model.config.image_token_id
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # SigLIP has no class token: 'patch' and 'full' select the same tokens, and LLaVA (so the import) says 'full'
    assert back.config.vision_feature_select == ("full" if vision == "siglip" else select)
    for field in ("vision_feature_layer", "image_size", "patch_size", "image_mean",
                  "image_std", "image_token", "image_token_id", "slice_start_token_id", "slice_end_token_id",
                  "delimit_images", "use_slicing", "tie_word_embeddings"):  # fmt: skip
        assert getattr(back.config, field) == getattr(model.config, field), field
    assert back_processor.tokenizer.chat_template == processor.tokenizer.chat_template
    assert back.language_model.generation_config.eos_token_id == model.language_model.generation_config.eos_token_id
    a = processor.collate([processor.encode_prompt(MESSAGES, [NOISE])])
    b = back_processor.collate([back_processor.encode_prompt(MESSAGES, [NOISE])])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        la = model(a["input_ids"], a["pixel_values"], a["attention_mask"]).logits
        lb = back(b["input_ids"], b["pixel_values"], b["attention_mask"]).logits
    assert torch.equal(la, lb)
    request = [Request([NOISE], MESSAGES)]
    assert generate(back, back_processor, request, max_new_tokens=5) == generate(
        model, processor, request, max_new_tokens=5
    )


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"projector_hidden_act": "relu"}, "projector_hidden_act is 'relu'"),
        ({"vision_feature_layer": [-2, -1]}, r"vision_feature_layer is \[-2, -1\]"),
        ({"multimodal_projector_bias": False}, "multimodal_projector_bias is False"),
    ],
)
def test_import_refuses_what_mpm_cannot_express(exported, tmp_path, changes, reason):
    _, llava_dir = exported()
    _edit_config(llava_dir, **changes)
    with pytest.raises(ExportError, match=reason):
        import_llava(llava_dir, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_import_refuses_default_selection_on_siglip(exported, tmp_path):
    # LLaVA's 'default' drops the first token, which SigLIP has no class token for: MPM cannot drop a patch
    _, llava_dir = exported(vision="siglip")
    _edit_config(llava_dir, vision_feature_select_strategy="default")
    with pytest.raises(ExportError, match="'default' with a siglip_vision_model tower"):
        import_llava(llava_dir, tmp_path / "back")


def test_a_native_llava_gets_the_slice_tokens_and_the_same_logits(tmp_path):
    """A LLaVA checkpoint MPM did not write: no slice tokens in its tokenizer, a center-cropping image processor."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tests.mpm.conftest import text_config, vision_config

    tok = make_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    config = LlavaConfig(
        vision_config=vision_config("clip"),
        text_config=text_config("llama", len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(tmp_path / "llava")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
        vision_feature_select_strategy="default", chat_template=tok.chat_template,
    ).save_pretrained(tmp_path / "llava")  # fmt: skip
    model, processor = load_model(import_llava(tmp_path / "llava", tmp_path / "mpm"), device="cpu")
    vocab = processor.tokenizer.get_vocab()
    assert "<slice>" in vocab and "</slice>" in vocab
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    square = NOISE.resize((40, 40))  # MPM resizes the whole image; cropping a square one changes nothing
    ours = processor.collate([processor.encode_prompt(MESSAGES, [square])])
    llava_processor = LlavaProcessor.from_pretrained(tmp_path / "llava")
    text = llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    theirs = llava_processor(images=[square], text=[text], return_tensors="pt")
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    with torch.no_grad():
        a = model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"]).logits
        b = llava(**theirs).logits
    assert torch.allclose(a[..., : b.shape[-1]], b, atol=1e-4)  # and two more: the added slice tokens
