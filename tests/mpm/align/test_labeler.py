"""The RLAIF-V labeler scorer: yes/no token ids per language, and P(yes) / (P(yes) + P(no)) from one forward step."""

import math

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from mpm.align.labeler import load_yes_no_table, score_questions, yes_no_token_ids
from mpm.align.pairs import claim_accepted
from mpm.core.errors import ConfigError
from mpm.export import export_llava
from mpm.inference import load_model
from tests.mpm.conftest import make_tokenizer

RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (24, 56), (10, 10, 220))
ITEMS = [
    (RED, "Is the picture red? Please answer yes or no."),
    (BLUE, "Is there a circle?"),
    (RED, "Look at <image> here: is it blue, or is it a red square on the left?"),  # marker mid-question
    (BLUE, "这是蓝色吗？"),
]


def test_table_has_every_language_with_rlaifv_forms():
    table = load_yes_no_table()
    assert set(table) == {"en", "zh", "de", "fr", "es", "ja"}
    assert {"yes", "Yes"} <= set(table["en"]["yes"]) and {"no", "No"} <= set(table["en"]["no"])  # RLAIF-V's four
    assert (
        "是" in table["zh"]["yes"] and "否" in table["zh"]["no"] and table["ja"] == {"yes": ["はい"], "no": ["いいえ"]}
    )


def test_without_a_single_token_form_the_first_token_counts_unless_shared_with_the_other_word():
    tok = make_tokenizer()  # byte-level BPE of 300 tokens: "yes" -> y e s, " yes" -> Ġ y e s, " no" -> Ġ n o
    ids = yes_no_token_ids(tok, "en")
    # no en form is one token here, so the first-token rule applies to both words:
    # y / Y begin only yes forms, n / N only no forms; the bare-space Ġ begins both " yes" and " no": neither
    assert tok.convert_ids_to_tokens(list(ids.yes)) == ["y", "Y"]
    assert tok.convert_ids_to_tokens(list(ids.no)) == ["n", "N"]


def test_single_token_forms_are_read_whole_and_split_forms_ignored(tmp_path):
    # "Yes" / "No" are whole tokens; "yes", "no", "YES"... split into letters whose first ("y", "n") also begins
    # unrelated words ("you", "not"): only the whole tokens count, as RLAIF-V reads yes / Yes / no / No
    vocab = ["Yes", "No", "Ġ", "y", "e", "s", "Y", "E", "S", "n", "o", "N", "O", "Ye"]
    merges = [("Y", "e"), ("Ye", "s"), ("N", "o")]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert tok("Yes", add_special_tokens=False)["input_ids"] == [0]
    assert tok("yes", add_special_tokens=False)["input_ids"] == [3, 4, 5]
    ids = yes_no_token_ids(tok, "en")
    assert tok.convert_ids_to_tokens(list(ids.yes)) == ["Yes"]
    assert tok.convert_ids_to_tokens(list(ids.no)) == ["No"]
    (tmp_path / "t.yaml").write_text('xx:\n  "yes": ["Yes", "yes"]\n  "no": ["ü"]\n')
    with pytest.raises(ConfigError, match="no usable 'no' token for language 'xx'") as err:
        yes_no_token_ids(tok, "xx", tmp_path / "t.yaml")
    assert "yes 'Yes' -> ['Yes'] (used)" in str(err.value)
    assert "yes 'yes' -> ['y', 'e', 's'] (3 tokens, not used: other forms of the word are one token)" in str(err.value)


def test_each_word_falls_back_to_the_first_token_on_its_own(tmp_path):
    # Spanish on a vocabulary with a whole "no" but no whole "sí": no reads only "no"; sí, split into s + í, falls
    # back to its first token (better than no yes token at all)
    vocab = ["<unk>", "s", "í", "S", "n", "o", "N", "no", "No"]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, [("n", "o"), ("N", "o")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    (tmp_path / "t.yaml").write_text('es:\n  "yes": ["sí", "Sí"]\n  "no": ["no", "No", "nop"]\n')
    pieces = {f: tok.convert_ids_to_tokens(tok(f, add_special_tokens=False)["input_ids"]) for f in ("sí", "no", "nop")}
    assert pieces == {"sí": ["s", "í"], "no": ["no"], "nop": ["no", "<unk>"]}  # "nop" is split: not used
    ids = yes_no_token_ids(tok, "es", tmp_path / "t.yaml")
    assert tok.convert_ids_to_tokens(list(ids.yes)) == ["s", "S"]
    assert tok.convert_ids_to_tokens(list(ids.no)) == ["no", "No"]


def word_level_tokenizer(words):
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>")


def test_a_vocabulary_lacking_the_words_is_refused_with_their_tokenizations():
    tok = word_level_tokenizer(["Ja", "ok"])  # German "ja" but no "nein": every no form is <unk>
    with pytest.raises(ConfigError, match="no usable 'no' token for language 'de'") as err:
        yes_no_token_ids(tok, "de")
    message = str(err.value)
    assert "no 'nein' -> ['<unk>'] (first token '<unk>' is a special (or unknown) token)" in message
    assert "no ' Nein' -> ['<unk>']" in message and "yes 'Ja' -> ['Ja'] (used)" in message


@pytest.mark.parametrize(("lang", "lacking"), [("ja", "'yes' or 'no'"), ("zh", "'yes'")])
def test_a_first_token_shared_by_both_words_is_refused(lang, lacking):
    # byte-level BPE without CJK merges: はい and いいえ both start with byte token 'ã'; 是 and 没有 with 'æ'
    with pytest.raises(ConfigError, match=f"no usable {lacking} token for language '{lang}'") as err:
        yes_no_token_ids(make_tokenizer(), lang)
    first = {"ja": "'ã'", "zh": "'æ'"}[lang]
    assert f"first token {first} also begins a form of the other word" in str(err.value)
    assert ("yes 'はい' -> ['ã', 'ģ', '¯', 'ã', 'ģ', 'Ħ']" in str(err.value)) == (lang == "ja")


def test_unknown_language_lists_the_tables_languages():
    with pytest.raises(ConfigError, match="language 'pt' .*its languages: de, en, es, fr, ja, zh"):
        yes_no_token_ids(make_tokenizer(), "pt")


def test_a_custom_table_is_used_and_checked(tmp_path):
    (tmp_path / "ok.yaml").write_text('xx:\n  "yes": ["Y"]\n  "no": ["N"]\n')
    tok = make_tokenizer()
    assert yes_no_token_ids(tok, "xx", tmp_path / "ok.yaml").yes == (tok.convert_tokens_to_ids("Y"),)
    (tmp_path / "bad.yaml").write_text('xx:\n  "yes": ["Y"]\n')
    with pytest.raises(ConfigError, match="bad.yaml: language 'xx' must have exactly the keys 'yes' and 'no'"):
        yes_no_token_ids(tok, "xx", tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text('xx:\n  "yes": ["Y"]\n  "no": [""]\n')
    with pytest.raises(ConfigError, match="xx.no must be a non-empty list of non-empty strings"):
        yes_no_token_ids(tok, "xx", tmp_path / "empty.yaml")


def fixed_head(model, bias: dict[int, float]):
    """An LM head that ignores the hidden state: logits = bias (0 for every token not in `bias`)."""
    lm = model.language_model
    head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    for token, value in bias.items():
        head.bias.data[token] = value
    lm.lm_head = head


def test_score_follows_a_fixed_head(tiny):
    model, processor = tiny(text="llama")  # untied head
    ids = yes_no_token_ids(processor.tokenizer, "en")  # yes: y, Y; no: n, N
    yes_id, no_id = ids.yes[1], ids.no[1]
    # logits 0 except one yes token at 3: P(yes) / (P(yes) + P(no)) = (e^3 + 1) / (e^3 + 1 + 2)
    fixed_head(model, {yes_id: 3.0})
    [score] = score_questions(model.eval(), processor, ITEMS[:1], "en")
    assert score == pytest.approx((math.e**3 + 1) / (math.e**3 + 3), abs=1e-6) and claim_accepted(score)
    fixed_head(model, {no_id: 3.0})
    [score] = score_questions(model, processor, ITEMS[:1], "en")
    assert score == pytest.approx(2 / (math.e**3 + 3), abs=1e-6) and not claim_accepted(score)
    # mass on tokens that are neither yes nor no (the bare space, which begins both) counts for neither
    fixed_head(model, {processor.tokenizer.convert_tokens_to_ids("Ġ"): 20.0, yes_id: 1.0})
    [score] = score_questions(model, processor, ITEMS[:1], "en")
    assert score == pytest.approx((math.e + 1) / (math.e + 3), abs=1e-5)


def test_score_reads_the_step_after_the_generation_prompt(tiny):
    model, processor = tiny()
    model.eval()
    ids = yes_no_token_ids(processor.tokenizer, "en")
    messages = [{"role": "user", "content": "<image>\n" + ITEMS[0][1]}]
    inputs = processor.collate([processor.encode_prompt(messages, [RED])])
    with torch.no_grad():
        p = model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]).logits[0, -1].softmax(-1)
    expected = p[list(ids.yes)].sum() / (p[list(ids.yes)].sum() + p[list(ids.no)].sum())
    assert score_questions(model, processor, ITEMS[:1], "en") == pytest.approx([expected.item()], abs=1e-5)


def test_batched_scores_equal_one_at_a_time(tiny):
    model, processor = tiny(use_slicing=True, scale_resolution=32, max_slices=4)  # prompts of different lengths
    model.eval()
    batched = score_questions(model, processor, ITEMS, "en", batch_size=3)
    single = score_questions(model, processor, ITEMS, "en", batch_size=1)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 4) for s in single)) == len(ITEMS)  # the questions are told apart, not one constant
    assert all(0 < s < 1 for s in single)


def test_exported_llava_labeler_scores_the_same(tiny, tmp_path):
    model, processor = tiny()
    model.save_pretrained(tmp_path / "mpm")
    processor.save_pretrained(tmp_path / "mpm")
    llava, llava_processor = load_model(export_llava(tmp_path / "mpm", tmp_path / "llava"), device="cpu")
    ours = score_questions(model.eval(), processor, ITEMS, "en", batch_size=2)
    theirs = score_questions(llava, llava_processor, ITEMS, "en", batch_size=2)
    assert theirs == pytest.approx(ours, abs=1e-5)
    assert llava_processor.tokenizer.padding_side == "right"  # restored after left-padding a batch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size` must be an integer of at least 1, got 0"),
        ({"items": [(RED, "  ")]}, "item 0 must be an .image, question. pair with a non-empty question"),
        ({"items": [RED]}, "item 0 must be an .image, question. pair"),
    ],
)
def test_bad_arguments_are_refused(tiny, kwargs, match):
    model, processor = tiny()
    with pytest.raises(ConfigError, match=match):
        score_questions(model, processor, **{"items": ITEMS, "lang": "en", **kwargs})
