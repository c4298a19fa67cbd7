"""The processor: placeholders, chat formatting, labels on assistant tokens only, truncation, bad input."""

import pytest
import torch
from PIL import Image

from mpm.processor import IGNORE_INDEX, ProcessingError
from tests.mpm.conftest import make_tokenizer

RED, BLUE = Image.new("RGB", (40, 30), (220, 20, 20)), Image.new("RGB", (30, 40), (20, 20, 220))
DIALOGUE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "<image>\n这是什么颜色？"},
    {"role": "assistant", "content": "红色。"},
    {"role": "user", "content": "And this one? <image>"},
    {"role": "assistant", "content": "It is blue, 蓝色。"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "不客气。"},
]


def supervised_text(processor, encoded) -> str:
    return processor.tokenizer.decode(
        [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    )


@pytest.mark.parametrize("chat_template", [True, False], ids=["chat-template", "plain-template"])
def test_exactly_the_assistant_tokens_are_supervised(tiny, chat_template):
    model, processor = tiny(tokenizer=make_tokenizer(chat_template=chat_template))
    encoded = processor.encode_conversation(DIALOGUE, [RED, BLUE])
    eos = processor.tokenizer.eos_token
    turns = [m["content"] for m in DIALOGUE if m["role"] == "assistant"]
    lead = "" if chat_template else " "  # plain template: "Assistant:" + " answer": the space is the answer's
    expected = "".join(f"{lead}{t}{eos}\n" for t in turns)  # each assistant turn and what closes it, nothing else
    assert supervised_text(processor, encoded) == expected
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels))
    # the image placeholders are where the markers were, and the model accepts them
    n_image = sum(t == model.config.image_token_id for t in encoded.input_ids)
    assert n_image == 2 * processor.tokens_per_image(32, 32) and len(encoded.pixel_values) == 2
    assert torch.isfinite(model(**processor.collate([encoded])).loss)


# Qwen3's chat template (Qwen/Qwen3-8B tokenizer_config.json), tool-call branches left out: only an answer after the
# last user message gets the (empty) <think> block, so earlier turns render differently once later turns follow.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query_index == messages|length - 1 %}{%- set ns.last_query_index = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_renders_the_last_answer_differently_is_labelled_exactly(tiny):
    tok = make_tokenizer()
    tok.chat_template = QWEN3_TEMPLATE
    _, processor = tiny(tokenizer=tok)
    encoded = processor.encode_conversation(DIALOGUE, [RED, BLUE])
    assert processor.tokenizer.decode(encoded.input_ids).count("<think>") == 1  # only the last answer has it
    assert supervised_text(processor, encoded) == (
        "红色。<|im_end|>\nIt is blue, 蓝色。<|im_end|>\n<think>\n\n</think>\n\n不客气。<|im_end|>\n"
    )
    # an answer with trailing whitespace (kept by the template) still ends with its end-of-turn token
    spaced = [*DIALOGUE[:2], {"role": "assistant", "content": "It is red. "}, *DIALOGUE[3:]]
    encoded = processor.encode_conversation(spaced, [RED, BLUE])
    assert supervised_text(processor, encoded).startswith("It is red. <|im_end|>\nIt is blue")


def test_a_template_that_rewrites_earlier_answers_is_refused(tiny):
    tok = make_tokenizer()  # earlier answers are shortened to "..." once a later turn follows
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _, processor = tiny(tokenizer=tok)
    with pytest.raises(ProcessingError, match="does not render assistant turn 2 after its generation prompt"):
        processor.encode_conversation(DIALOGUE, [RED, BLUE])
    # the rewritten answer's text comes again later: found there, it would label the user turn in between
    repeated = [{"role": "user", "content": "<image>\nRed?"}, {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]  # fmt: skip
    with pytest.raises(ProcessingError, match="does not render assistant turn 1 after its generation prompt"):
        processor.encode_conversation(repeated, [RED])


def test_plain_template_and_no_pad_token(tiny):
    tok = make_tokenizer(chat_template=False, pad=False)
    model, processor = tiny(tokenizer=tok)
    assert tok.pad_token == tok.eos_token  # a tokenizer without a pad token gets its EOS as pad
    prompt = processor.encode_prompt([{"role": "user", "content": "<image>\nDescribe the image."}], [RED])
    assert processor.tokenizer.decode(prompt.input_ids).endswith("Describe the image.\nAssistant:")


@pytest.mark.parametrize(
    ("messages", "images", "message"),
    [
        (
            [{"role": "user", "content": "<image><image> Two?"}, {"role": "assistant", "content": "Yes."}],
            [RED],
            "2 <image> markers but 1 image$",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            [RED],
            "0 <image> markers but 1 image$",
        ),
        (
            [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "  "}],
            [RED],
            "assistant turn 1 is empty",
        ),
        ([{"role": "user", "content": "<image>\nHi"}], [RED], "must end with an assistant turn"),
    ],
)
def test_bad_conversations_are_clear_errors(tiny, messages, images, message):
    _, processor = tiny()
    with pytest.raises(ProcessingError, match=message):
        processor.encode_conversation(messages, images)


def test_truncation_never_cuts_image_placeholders(tiny):
    model, processor = tiny()
    full = processor.encode_conversation(DIALOGUE, [RED, BLUE])
    image_id = model.config.image_token_id
    second_image_start = [i for i, t in enumerate(full.input_ids) if t == image_id][16]
    cut = processor.encode_conversation(DIALOGUE, [RED, BLUE], max_length=second_image_start + 5)
    assert len(cut.input_ids) == second_image_start  # the second image did not fit whole: dropped, not cut
    assert sum(t == image_id for t in cut.input_ids) == 16 and len(cut.pixel_values) == 1
    assert supervised_text(processor, cut).startswith("红色。")
    assert torch.isfinite(model(**processor.collate([cut])).loss)
    with pytest.raises(ProcessingError, match="longer than max_length=10"):
        processor.encode_conversation(DIALOGUE, [RED, BLUE], max_length=10)
    first_answer = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    for max_length in range(first_answer + 1, len(full.input_ids)):  # every cut: within bounds, whole images
        cut = processor.encode_conversation(DIALOGUE, [RED, BLUE], max_length=max_length)
        placeholders = sum(t == image_id for t in cut.input_ids)
        assert len(cut.input_ids) <= max_length and placeholders == 16 * len(cut.pixel_values)


def test_a_template_that_refuses_a_conversation_is_a_processing_error(tiny):
    tok = make_tokenizer()
    tok.chat_template = (  # as Gemma's: no system role
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tok.chat_template
    )
    _, processor = tiny(tokenizer=tok)
    with pytest.raises(ProcessingError, match="System role not supported"):
        processor.encode_conversation(DIALOGUE, [RED, BLUE])


@pytest.mark.parametrize("connector", ["mlp", "resampler"])
def test_sliced_images_give_overview_and_rows_of_slices(tiny, connector):
    model, processor = tiny(connector=connector, use_slicing=True, scale_resolution=32, max_slices=9, image_size=32)
    big = Image.new("RGB", (96, 64), (10, 200, 10))  # 6 x (32x32): a 3x2 grid
    encoded = processor.encode_conversation(
        [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "Green."}], [big]
    )
    assert len(encoded.pixel_values) == 1 + 6
    text = processor.tokenizer.decode(encoded.input_ids)
    assert text.count("<slice>") == 6 and text.count("</slice>") == 6
    assert "</slice><slice>" in text and "</slice>\n<slice>" in text  # columns side by side, rows on new lines
    batch = processor.collate([encoded, processor.encode_conversation(DIALOGUE, [RED, BLUE])])
    assert isinstance(batch["pixel_values"], list)  # several sizes: a list, in placeholder order
    assert torch.isfinite(model(**batch).loss)


def test_raw_prompt_without_template(tiny):
    _, processor = tiny()
    encoded = processor.encode_prompt("<image>\nA photo of", [RED])
    text = processor.tokenizer.decode(encoded.input_ids)
    assert text.endswith("\nA photo of") and "<|im_start|>" not in text


def test_several_images_in_a_message_are_delimited_except_in_the_llava_layout(tiny):
    _, processor = tiny(connector="resampler", use_slicing=True, scale_resolution=32)
    assert processor.config.delimit_images  # from_parts' default outside the LLaVA layout
    text = processor.tokenizer.decode(processor.encode_prompt(DIALOGUE[:2] + DIALOGUE[3:4], [RED, BLUE]).input_ids)
    first, second = text.split("<image_end>")[:2]
    assert text.count("<image_start>") == text.count("<image_end>") == 2
    assert first.rsplit("<image_start>", 1)[1].startswith("<image>") and "<image_start>" in second
    _, llava = tiny()  # mlp without slicing: LLaVA's layout, which the export reproduces
    assert not llava.config.delimit_images
    assert "<image_start>" not in llava.tokenizer.decode(llava.encode_prompt(DIALOGUE[:2], [RED]).input_ids)


@pytest.mark.parametrize("text", ["qwen2", "llama", "gemma"])
def test_packed_samples_give_each_sample_its_own_loss(tiny, text):
    from mpm.recipes.i2t import nll_sum, packing_keeps_samples_apart

    model, processor = tiny(connector="resampler", text=text)
    model.eval()
    assert packing_keeps_samples_apart(model.language_model)
    items = [
        processor.encode_conversation(DIALOGUE, [RED, BLUE]),
        processor.encode_conversation([{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Red."}], [RED]),
        processor.encode_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}], []),
    ]  # fmt: skip
    packed = processor.collate_packed(items)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        together, tokens = nll_sum(model, packed, supervised_logits_only=True)
        alone = [nll_sum(model, processor.collate([x]), supervised_logits_only=False) for x in items]
    assert tokens == sum(n for _, n in alone)
    assert torch.allclose(together, sum(loss for loss, _ in alone), rtol=1e-5)
    assert packed["position_ids"][0].tolist() == [p for x in items for p in range(len(x.input_ids))]


def test_truncation_drops_an_image_with_its_delimiters(tiny):
    _, processor = tiny(connector="resampler")
    cfg = processor.config
    messages = [{"role": "user", "content": "<image>\nA <image> B"}, {"role": "assistant", "content": "Blue and red."}]
    whole = processor.encode_conversation(messages, [RED, BLUE])
    second = whole.input_ids.index(cfg.image_start_token_id, whole.input_ids.index(cfg.image_end_token_id))
    for max_length in range(second + 1, second + cfg.num_queries + 3):  # every cut inside the second image
        try:
            cut = processor.encode_conversation(messages, [RED, BLUE], max_length=max_length)
        except ProcessingError:
            continue  # nothing supervised left: refused, fine
        assert cut.input_ids.count(cfg.image_start_token_id) == cut.input_ids.count(cfg.image_end_token_id)
