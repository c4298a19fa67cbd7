"""Machine translation backends: NLLB / M2M100 / Marian through transformers, or an OpenAI-compatible endpoint.

Language codes are ISO 639-1 everywhere in this project; each model family has its own names, mapped here:
NLLB uses FLORES-200 codes ("zho_Hans"), M2M100 ISO 639-1 ("zh"), multi-target Marian models a ">>code<<"
prefix token. Translators take plain text segments (no markup) and yield one translation per segment, in order, as
they are made (a `TranslationError` for a segment that failed); caching and the structure of conversations are the
caller's job (unimm_chat.translate).

A local model never reads or writes past its position table: inputs longer than the encoder's positions are failed
segments, and generation is capped at the decoder's (a translation cut there is a failed segment, not a crash). An
endpoint that cannot be reached, or refuses every request, raises `TranslatorFailing` instead of failing every
segment one by one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from mpm.core.errors import ConfigError, EndpointError, model_errors
from mpm.core.http import ChatClient, LLMError

logger = logging.getLogger(__name__)
MAX_FAILURES_IN_A_ROW = 25  # an endpoint that fails this many segments in a row is down or misconfigured (as build)

# ISO 639-1 -> (English name, FLORES-200 code used by NLLB-200). Codes from the NLLB-200 model card's language
# list (facebook/nllb-200-distilled-600M, "Languages": FLORES-200 codes).
LANGUAGES = {
    "en": ("English", "eng_Latn"), "zh": ("Chinese (Simplified)", "zho_Hans"), "de": ("German", "deu_Latn"),
    "fr": ("French", "fra_Latn"), "es": ("Spanish", "spa_Latn"), "it": ("Italian", "ita_Latn"),
    "pt": ("Portuguese", "por_Latn"), "ru": ("Russian", "rus_Cyrl"), "ja": ("Japanese", "jpn_Jpan"),
    "ko": ("Korean", "kor_Hang"), "ar": ("Arabic", "arb_Arab"), "hi": ("Hindi", "hin_Deva"),
    "bn": ("Bengali", "ben_Beng"), "th": ("Thai", "tha_Thai"), "vi": ("Vietnamese", "vie_Latn"),
    "id": ("Indonesian", "ind_Latn"), "ms": ("Malay", "zsm_Latn"), "tr": ("Turkish", "tur_Latn"),
    "pl": ("Polish", "pol_Latn"), "nl": ("Dutch", "nld_Latn"), "sv": ("Swedish", "swe_Latn"),
    "da": ("Danish", "dan_Latn"), "fi": ("Finnish", "fin_Latn"), "no": ("Norwegian", "nob_Latn"),
    "cs": ("Czech", "ces_Latn"), "el": ("Greek", "ell_Grek"), "he": ("Hebrew", "heb_Hebr"),
    "fa": ("Persian", "pes_Arab"), "uk": ("Ukrainian", "ukr_Cyrl"), "ro": ("Romanian", "ron_Latn"),
    "hu": ("Hungarian", "hun_Latn"), "bg": ("Bulgarian", "bul_Cyrl"), "sw": ("Swahili", "swh_Latn"),
    "ta": ("Tamil", "tam_Taml"), "te": ("Telugu", "tel_Telu"), "ur": ("Urdu", "urd_Arab"),
    "mr": ("Marathi", "mar_Deva"), "gu": ("Gujarati", "guj_Gujr"), "kn": ("Kannada", "kan_Knda"),
    "ml": ("Malayalam", "mal_Mlym"), "pa": ("Punjabi", "pan_Guru"), "am": ("Amharic", "amh_Ethi"),
    "yo": ("Yoruba", "yor_Latn"), "tl": ("Tagalog", "tgl_Latn"), "my": ("Burmese", "mya_Mymr"),
    "km": ("Khmer", "khm_Khmr"), "lo": ("Lao", "lao_Laoo"), "ne": ("Nepali", "npi_Deva"),
    "si": ("Sinhala", "sin_Sinh"), "ka": ("Georgian", "kat_Geor"), "hy": ("Armenian", "hye_Armn"),
    "az": ("Azerbaijani", "azj_Latn"), "kk": ("Kazakh", "kaz_Cyrl"), "uz": ("Uzbek", "uzn_Latn"),
    "ca": ("Catalan", "cat_Latn"), "eu": ("Basque", "eus_Latn"), "gl": ("Galician", "glg_Latn"),
    "hr": ("Croatian", "hrv_Latn"), "sr": ("Serbian", "srp_Cyrl"), "sk": ("Slovak", "slk_Latn"),
    "sl": ("Slovenian", "slv_Latn"), "lt": ("Lithuanian", "lit_Latn"), "lv": ("Latvian", "lvs_Latn"),
    "et": ("Estonian", "est_Latn"),
}  # fmt: skip
# fastText lid.176 labels that count as the requested language (it calls some Chinese sentences Cantonese or Wu).
LANGID_ALIASES = {"zh": {"zh", "yue", "wuu"}}


class TranslationError(Exception):
    """One segment could not be translated (the request failed, or the output was cut short)."""


class TranslatorFailing(EndpointError):
    """The translation endpoint fails every request the same way (down, wrong URL, key or model): stop early."""


def position_limit(config, side: str) -> int | None:
    """How many positions the model's encoder (`side="source"`) or decoder (`"target"`) has: fairseq-style
    `max_{side}_positions` where a family has them, else `max_position_embeddings` (Marian, M2M100, NLLB, BART),
    else `n_positions`; None for models without a fixed table (relative positions, T5)."""
    for name in (f"max_{side}_positions", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def language_name(code: str) -> str:
    if code not in LANGUAGES:
        raise ConfigError(f"no translation mapping for language {code!r}; known: {sorted(LANGUAGES)}")
    return LANGUAGES[code][0]


class HFTranslator:
    """A seq2seq MT model through transformers; the family is detected from the checkpoint."""

    def __init__(
        self,
        model: str,
        batch_size: int = 16,
        max_new_tokens: int = 512,
        num_beams: int = 1,
        device: str = "auto",
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.torch = torch
        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        with model_errors("model", model):
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model.to(self.device)
        self.model.eval()
        self.name = model
        self.batch_size, self.num_beams = batch_size, num_beams
        model_type = self.model.config.model_type
        vocab = self.tokenizer.get_vocab()
        if model_type == "m2m_100":
            self.family = "nllb" if "eng_Latn" in vocab else "m2m100"
        elif model_type == "marian":
            self.family = "marian"
            self.target_tokens = {t for t in vocab if t.startswith(">>") and t.endswith("<<")}
        else:
            raise ConfigError(
                f"{model}: translation models of type {model_type!r} are not supported; use an NLLB, M2M100 or "
                "Marian checkpoint, or --backend openai"
            )
        # The decoder's first position holds the decoder start token: a translation has at most limit - 1 tokens.
        # Past its table a learned/fixed position embedding raises IndexError (Marian) or reads positions the model
        # never saw (M2M100, NLLB), so generation stops there and such a translation counts as cut.
        target_limit = position_limit(self.model.config, "target")
        self.max_new_tokens = max_new_tokens if target_limit is None else min(max_new_tokens, target_limit - 1)
        self.cut_reason = (
            f"max_new_tokens={self.max_new_tokens}"
            if self.max_new_tokens == max_new_tokens
            else f"the model's limit of {self.max_new_tokens} tokens (its decoder has {target_limit} positions)"
        )
        if self.max_new_tokens < max_new_tokens - 1:  # (512 asked, 511 possible: Marian's default, not worth a warning)
            logger.warning(
                "%s writes at most %d tokens (its decoder has %d positions): generation stops there, not at "
                "hf.max_new_tokens=%d; a translation cut there is rejected (translation_failed)",
                model,
                self.max_new_tokens,
                target_limit,
                max_new_tokens,
            )
        # Inputs: the tokenizer's own limit, or the encoder's positions if those are fewer (a tokenizer saved without
        # model_max_length says 1e30).
        source_limit = position_limit(self.model.config, "source")
        self.input_limit = min(self.tokenizer.model_max_length, source_limit or self.tokenizer.model_max_length)

    def _setup(self, source: str, target: str) -> tuple[dict, str]:
        """(generate() keyword arguments, text prefix) for a language pair."""
        if self.family == "nllb":
            self.tokenizer.src_lang = LANGUAGES[source][1]
            return {"forced_bos_token_id": self.tokenizer.convert_tokens_to_ids(LANGUAGES[target][1])}, ""
        if self.family == "m2m100":
            self.tokenizer.src_lang = source
            return {"forced_bos_token_id": self.tokenizer.get_lang_id(target)}, ""
        if not self.target_tokens:
            return {}, ""  # a single-pair Marian model (opus-mt-en-de): the target is the model's
        nllb = LANGUAGES[target][1]
        for token in (
            f">>{nllb}<<",
            f">>{nllb.split('_')[0]}<<",
            f">>{target}<<",
            ">>cmn_Hans<<" if target == "zh" else "",
        ):
            if token in self.target_tokens:
                return {}, token + " "
        raise ConfigError(
            f"this Marian model has no target token for {target!r} (it knows {sorted(self.target_tokens)[:20]})"
        )

    @property
    def settings(self) -> tuple:
        """What changes the output: part of every cache key (the generation length actually used)."""
        return ("hf", self.family, self.max_new_tokens, self.num_beams)

    def target_hint(self, target: str) -> str:
        """Why this model may write another language than `target`, and what to do (a sentence for the caller's
        error)."""
        if self.family in ("nllb", "m2m100"):
            token = LANGUAGES[target][1] if self.family == "nllb" else self.tokenizer.get_lang_token(target)
            return (
                f"NLLB/M2M100 models are told the output language by a forced first token ({token}), and this "
                "checkpoint does not follow it: use a trained NLLB or M2M100 translation model, not a random or "
                "fine-tuned one."
            )
        if not self.target_tokens:
            return (
                "A single-pair Marian model (opus-mt-en-de) always writes its own target language: use the opus-mt "
                f"model into {language_name(target)}, or a multilingual NLLB/M2M100 model."
            )
        return f"This multilingual Marian model does not follow its target token ({self._setup('en', target)[1]})."

    def translate(self, texts: Sequence[str], target: str, source: str = "en") -> Iterator[str | TranslationError]:
        kwargs, prefix = self._setup(source, target)
        limit = self.input_limit
        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        for start in range(0, len(texts), self.batch_size):
            batch = [prefix + t for t in texts[start : start + self.batch_size]]
            lengths = [len(ids) for ids in self.tokenizer(batch)["input_ids"]]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=limit)
            with self.torch.no_grad():
                generated = self.model.generate(
                    **enc.to(self.device), max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, **kwargs
                )
            decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            full = generated.shape[1] - 1 >= self.max_new_tokens  # the longest row used every token it could
            for length, ids, text in zip(lengths, generated.tolist(), decoded):
                if length > limit:
                    yield TranslationError(f"the segment has {length} tokens; the model reads at most {limit}")
                elif eos_ids and self._cut(ids[1:], eos_ids, full):
                    yield TranslationError(f"the translation was cut at {self.cut_reason}")
                else:
                    yield text.strip()

    @staticmethod
    def _cut(ids: list[int], eos_ids: set[int], full: bool) -> bool:
        """Did generation stop at the length limit? `ids`: the generated tokens, after the decoder start token. No
        end-of-sequence at all, or one only in the very last place of a row that used every token: Marian configs
        force EOS there (`forced_eos_token_id`), so a cut translation does end with one."""
        first = next((i for i, token in enumerate(ids) if token in eos_ids), None)
        return first is None or (full and first == len(ids) - 1)


class EndpointTranslator:
    """Translation by an OpenAI-compatible chat endpoint, one request per segment (`concurrency` in flight)."""

    PROMPT = (
        "Translate the following text from {source} to {target}. Keep the meaning, tone and any numbers exactly. "
        "Reply with the translation only, without quotes or explanations.\n\n{text}"
    )

    def __init__(self, client: ChatClient, max_failures_in_a_row: int | None = None):
        self.client = client
        self.name = client.model
        self.max_failures_in_a_row = max_failures_in_a_row or MAX_FAILURES_IN_A_ROW
        self.failures_in_a_row = 0  # across calls: the segments come in chunks

    @property
    def settings(self) -> tuple:
        """What changes the output: part of every cache key."""
        return ("openai", self.PROMPT, self.client.params)

    def target_hint(self, target: str) -> str:
        return (
            f"The model behind {self.client.url} does not follow the translation prompt into {language_name(target)}: "
            f"use an instruction-following chat model that writes {language_name(target)}."
        )

    def messages(self, text: str, target: str, source: str) -> list[dict]:
        prompt = self.PROMPT.format(source=language_name(source), target=language_name(target), text=text)
        return [{"role": "user", "content": prompt}]

    def translate(self, texts: Sequence[str], target: str, source: str = "en") -> Iterator[str | TranslationError]:
        """Translations in order, as they arrive. Raises `TranslatorFailing` at a fatal error (nothing listens at
        the URL; 401/403/404) or after `max_failures_in_a_row` failed segments; requests not yet made are dropped."""
        requests = ((str(i), self.messages(t, target, source)) for i, t in enumerate(texts))
        with contextlib.closing(self.client.complete_many(requests)) as replies:
            for _, reply, _ in replies:
                if not isinstance(reply, LLMError):
                    self.failures_in_a_row = 0
                    yield reply.strip()
                    continue
                self.failures_in_a_row += 1
                if reply.fatal or self.failures_in_a_row >= self.max_failures_in_a_row:
                    what = "" if reply.fatal else f" ({self.failures_in_a_row} segments in a row failed)"
                    where = "" if self.client.url in str(reply) else f" at {self.client.url}"
                    raise TranslatorFailing(
                        f"stopping: translation by model {self.client.model!r}{where} fails{what}: {reply}"
                    )
                yield TranslationError(str(reply))
