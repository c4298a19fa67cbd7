"""An exported LLaVA checkpoint carries what vLLM and SGLang read: they load it with transformers' Auto classes,
count an image's tokens from the processor's settings, and render the chat template with string contents."""

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from mpm.export import export_llava


def test_the_export_loads_through_the_auto_classes_servers_use(tiny, tmp_path):
    torch.manual_seed(0)
    model, processor = tiny()
    model.save_pretrained(tmp_path / "mpm")
    processor.save_pretrained(tmp_path / "mpm")
    out = export_llava(tmp_path / "mpm", tmp_path / "llava")

    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlavaForConditionalGeneration"]  # how vLLM picks its model class
    llava = AutoModelForImageTextToText.from_pretrained(out)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"

    hf_processor = AutoProcessor.from_pretrained(out)
    assert type(hf_processor).__name__ == "LlavaProcessor"
    assert hf_processor.patch_size == config.vision_config.patch_size
    assert hf_processor.vision_feature_select_strategy == config.vision_feature_select_strategy
    image = Image.new("RGB", (50, 30), (10, 200, 30))
    messages = [{"role": "user", "content": f"{hf_processor.image_token}\nWhat colour is it?"}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)  # string contents (vLLM's "string")
    assert hf_processor.image_token in text
    inputs = hf_processor(images=[image], text=[text], return_tensors="pt")
    expanded = int((inputs["input_ids"] == config.image_token_index).sum())
    with torch.no_grad():  # transformers' LLaVA refuses a prompt whose image tokens do not match the features
        llava(**inputs)
    ours = processor.encode_prompt(messages, [image]).input_ids
    assert expanded == ours.count(model.config.image_token_id)  # the count MPM trained with
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template or hf_processor.chat_template  # a server needs one to format chat requests
    assert llava.generation_config.eos_token_id is not None  # where a server stops
