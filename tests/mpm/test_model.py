"""The model: every tower x LM x connector builds, trains a step, saves and reloads to identical logits."""

import pytest
import torch
from PIL import Image
from transformers import AutoModel

from mpm.configuration import MPMConfig
from mpm.modeling import MPMForConditionalGeneration
from mpm.processor import MPMProcessor

CONVERSATION = [
    {"role": "user", "content": "<image>\nDescribe the image."},
    {"role": "assistant", "content": "A red square."},
]
COMBOS = [
    ("clip", "qwen2", "mlp"), ("clip", "llama", "resampler"), ("clip", "gemma", "bridge"),
    ("siglip", "qwen2", "resampler"), ("siglip", "llama", "bridge"), ("siglip", "gemma", "mlp"),
    ("resnet", "qwen2", "mlp"), ("resnet", "llama", "resampler"), ("clip", "qwen2", "bridge_experts"),
]  # fmt: skip


@pytest.mark.parametrize(("vision", "text", "connector"), COMBOS, ids=["-".join(c) for c in COMBOS])
def test_forward_backward_save_load(tiny, tmp_path, vision, text, connector):
    experts = connector == "bridge_experts"
    model, processor = tiny(vision, text, "bridge" if experts else connector, bridge_experts=experts)
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    batch = processor.collate([processor.encode_conversation(CONVERSATION, [image])] * 2)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    reloaded = AutoModel.from_pretrained(tmp_path)
    reprocessor = MPMProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, MPMForConditionalGeneration)
    again = reprocessor.collate([reprocessor.encode_conversation(CONVERSATION, [image])] * 2)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**again).logits, atol=1e-5)


def test_generate_returns_new_tokens(tiny):
    model, processor = tiny()
    enc = processor.encode_prompt([{"role": "user", "content": "<image>\nWhat is this?"}], [Image.new("RGB", (32, 32))])
    batch = processor.collate([enc], padding_side="left")
    out = model.generate(
        batch["input_ids"], batch["pixel_values"], batch["attention_mask"], max_new_tokens=5, do_sample=False
    )
    assert out.shape == (1, 5)


def test_placeholder_count_mismatch_is_a_clear_error(tiny):
    model, processor = tiny()
    batch = processor.collate([processor.encode_conversation(CONVERSATION, [Image.new("RGB", (32, 32))])])
    with pytest.raises(ValueError, match="image placeholder tokens but the images give"):
        model(batch["input_ids"], torch.zeros(2, 3, 32, 32))


def test_bridge_needs_a_vit_and_unknown_towers_and_connectors_are_refused(tiny):
    from transformers import Dinov2Config

    with pytest.raises(ValueError, match="bridge connector runs its queries through a ViT"):
        tiny("resnet", "qwen2", "bridge")
    with pytest.raises(ValueError, match="vision towers of type 'dinov2' are not supported"):
        MPMConfig(vision_config=Dinov2Config(), connector_type="mlp")
    with pytest.raises(ValueError, match=r"`connector_type` must be one of \[.*'resampler'.*got 'resampeler'"):
        tiny(connector="resampeler")


def convnext_config():
    from transformers import ConvNextConfig

    return ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, patch_size=4)


@pytest.mark.parametrize("vision", ["clip", "siglip", "resnet", "convnext"])
@pytest.mark.parametrize("layer", [-1, -2, 0, 1])
def test_the_tower_stops_at_the_feature_layer_with_the_same_features(vision, layer):
    from transformers import AutoModel

    from mpm.vision import patch_features
    from tests.mpm.conftest import vision_config

    torch.manual_seed(0)
    tower = AutoModel.from_config(convnext_config() if vision == "convnext" else vision_config(vision)).eval()
    pixels = torch.randn(2, 3, 32, 48)  # not the tower's own size: ViT positions are interpolated
    with torch.no_grad():
        early = patch_features(tower, pixels, layer, "full", early_exit=True)
        whole = patch_features(tower, pixels, layer, "full", early_exit=False)
    assert early.shape == whole.shape and torch.allclose(early, whole, atol=1e-5)


def test_bridge_experts_start_as_the_tower_and_train_only_the_query_path(tiny):
    from mpm.core.config import load_config
    from mpm.train_config import TrainConfig
    from mpm.training import set_trainable

    model, processor = tiny("clip", "qwen2", "bridge", bridge_experts=True, vision_feature_layer=-1)
    shared, _ = tiny("clip", "qwen2", "bridge", vision_feature_layer=-1)
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if ".experts." not in k})
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the experts are copies of the tower's norms and MLPs: the same tokens at first
        assert torch.allclose(
            torch.stack(model.image_tokens(pixels)), torch.stack(shared.image_tokens(pixels)), atol=1e-5
        )
    assert len(model.connector.experts) == model.config.vision_config.num_hidden_layers  # layer -1: all of them
    set_trainable(model, load_config(TrainConfig, None, None, ["train.vision=frozen"]).train)
    batch = processor.collate([processor.encode_conversation(CONVERSATION, [Image.new("RGB", (32, 32), "red")])])
    model(**batch).loss.backward()
    experts = dict(model.connector.experts.named_parameters())
    assert experts and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in experts.values())
    assert all(p.grad is None for p in model.vision_tower.parameters())  # the patch path stays frozen


def test_text_only_batch_in_training_touches_the_connector(tiny):
    model, processor = tiny()
    batch = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], [])])  # fmt: skip
    assert batch.get("pixel_values") is None
    model.train()
    model(**batch).loss.backward()
    # zero gradients, but gradients: data-parallel training needs every trainable parameter used in every step
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.connector.parameters())


def test_tokens_added_to_a_padded_vocabulary_start_at_the_mean_embedding():
    from tests.mpm.conftest import make_tokenizer, text_config, vision_config

    tok = make_tokenizer()
    known = len(tok)
    model, _ = MPMForConditionalGeneration.from_parts(
        vision_config("clip"), text_config("llama", known + 8), tokenizer=tok, image_size=32
    )  # a vocabulary padded past the tokenizer (as Qwen2's): no resize, the tokens take spare rows
    for weight in (model.get_input_embeddings().weight, model.language_model.get_output_embeddings().weight):
        assert weight.shape[0] == known + 8
        assert torch.allclose(weight[known : known + 3], weight[:known].mean(0).expand(3, -1))
        assert not torch.allclose(weight[known + 3], weight[:known].mean(0))  # spare rows left alone


def test_parts_in_different_dtypes_make_one_model_that_runs(tmp_path):
    from transformers import CLIPVisionModel, Qwen2ForCausalLM

    from tests.mpm.conftest import make_tokenizer, text_config, vision_config

    tok = make_tokenizer()
    CLIPVisionModel(vision_config("clip")).save_pretrained(tmp_path / "vision")  # fp32, like CLIP-L on the hub
    Qwen2ForCausalLM(text_config("qwen2", len(tok))).to(torch.bfloat16).save_pretrained(tmp_path / "llm")  # bf16
    tok.save_pretrained(tmp_path / "llm")
    model, processor = MPMForConditionalGeneration.from_parts(tmp_path / "vision", tmp_path / "llm", image_size=32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = processor.collate(
        [processor.encode_prompt([{"role": "user", "content": "<image>\nHi"}], [Image.new("RGB", (32, 32))])]
    )
    assert torch.isfinite(model(**batch).logits.float()).all()


def test_parts_given_as_configs_take_the_dtype_asked_for():
    from tests.mpm.conftest import make_tokenizer, text_config, vision_config

    tok = make_tokenizer()
    model, _ = MPMForConditionalGeneration.from_parts(
        vision_config("clip"), text_config("qwen2", len(tok)), tokenizer=tok, dtype=torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_loaded_siglip_or_full_clip_model_gives_its_tower_and_statistics():
    from transformers import CLIPConfig, CLIPModel, SiglipVisionModel

    from mpm.parts import load_vision
    from tests.mpm.conftest import vision_config

    _, mean, std = load_vision(SiglipVisionModel(vision_config("siglip")))
    assert mean == std == [0.5, 0.5, 0.5]
    full = CLIPModel(CLIPConfig(vision_config=vision_config("clip").to_dict(), text_config={"hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}))  # fmt: skip
    tower, mean, _ = load_vision(full)
    assert tower.config.model_type == "clip_vision_model" and mean[0] == pytest.approx(0.4815, abs=1e-4)
    assert tower is full.vision_model


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_fsdp_auto_wrap_finds_every_no_split_class(tiny, vision):
    from accelerate.utils.dataclasses import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model, _ = tiny(vision=vision, connector="resampler")  # the parts' lists name e.g. CLIPTextEmbeddings
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # raises for a class the model does not hold
    assert sum(policy(m) for m in model.modules()) >= 4  # the vision and the LLM layers


def test_a_model_saved_before_delimiters_and_experts_existed_still_loads(tiny, tmp_path):
    import json

    model, processor = tiny(connector="resampler", delimit_images=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("delimit_images", "bridge_experts", "image_start_token", "image_end_token",
                "image_start_token_id", "image_end_token_id"):  # fmt: skip
        config.pop(key, None)  # as config.json files written before this change
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModel.from_pretrained(tmp_path)
    reprocessor = MPMProcessor.from_pretrained(tmp_path)
    assert not reloaded.config.delimit_images
    batch = reprocessor.collate([reprocessor.encode_conversation(CONVERSATION, [Image.new("RGB", (32, 32))])])
    assert "<image_start>" not in reprocessor.tokenizer.decode(batch["input_ids"][0])
    assert torch.isfinite(reloaded(**batch).loss)


def test_a_feature_layer_outside_the_tower_is_refused(tiny):
    with pytest.raises(
        ValueError, match="`vision_feature_layer` 3 is outside the clip_vision_model tower's hidden states"
    ):
        tiny(vision_feature_layer=3)  # 2 layers: hidden states 0..2


def test_a_connector_named_by_module_and_class_is_imported(tiny, tmp_path):
    model, _ = tiny(connector="mpm.connectors:MLPConnector")  # any importable module works the same way
    assert type(model.connector).__name__ == "MLPConnector"
    with pytest.raises(ValueError, match="cannot be imported"):
        tiny(connector="no_such_module:Thing")


def test_bridge_experts_are_checkpointed_with_the_tower(tiny):
    model, processor = tiny("clip", "qwen2", "bridge", bridge_experts=True, vision_feature_layer=-1)
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    batch = processor.collate([processor.encode_conversation(CONVERSATION, [Image.new("RGB", (32, 32), "red")])])
    model.train()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.connector.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model(**batch).loss.backward()
    assert all(torch.allclose(p.grad, plain[n], atol=1e-6) for n, p in model.connector.named_parameters())
