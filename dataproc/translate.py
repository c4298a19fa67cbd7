"""Machine translation backends: NLLB / M2M100 / Marian through transformers, or an OpenAI-compatible endpoint.

Language codes are ISO 639-1 everywhere in this project; each model family has its own names, mapped here:
NLLB uses FLORES-200 codes ("zho_Hans"), M2M100 ISO 639-1 ("zh"), multi-target Marian models a ">>code<<"
prefix token. Translators take plain text segments (no markup) and return one translation per segment; caching
and the structure of conversations are the caller's job (unimm_chat.translate).
"""

from __future__ import annotations

from collections.abc import Sequence

from mpm.core.errors import ConfigError, model_errors
from mpm.core.http import ChatClient, LLMError

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
        self.batch_size, self.max_new_tokens, self.num_beams = batch_size, max_new_tokens, num_beams
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
        """What changes the output: part of every cache key."""
        return ("hf", self.family, self.max_new_tokens, self.num_beams)

    def translate(self, texts: Sequence[str], target: str, source: str = "en") -> list[str | TranslationError]:
        kwargs, prefix = self._setup(source, target)
        limit = self.tokenizer.model_max_length
        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        out: list[str | TranslationError] = []
        for start in range(0, len(texts), self.batch_size):
            batch = [prefix + t for t in texts[start : start + self.batch_size]]
            lengths = [len(ids) for ids in self.tokenizer(batch)["input_ids"]]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True).to(self.device)
            with self.torch.no_grad():
                generated = self.model.generate(
                    **enc, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, **kwargs
                )
            decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for length, ids, text in zip(lengths, generated.tolist(), decoded):
                if length > limit:
                    out.append(TranslationError(f"the segment has {length} tokens; the model reads at most {limit}"))
                elif eos_ids and not eos_ids & set(ids):  # no end-of-sequence: generation stopped at the limit
                    out.append(TranslationError(f"the translation was cut at max_new_tokens={self.max_new_tokens}"))
                else:
                    out.append(text.strip())
        return out


class EndpointTranslator:
    """Translation by an OpenAI-compatible chat endpoint, one request per segment (`concurrency` in flight)."""

    PROMPT = (
        "Translate the following text from {source} to {target}. Keep the meaning, tone and any numbers exactly. "
        "Reply with the translation only, without quotes or explanations.\n\n{text}"
    )

    def __init__(self, client: ChatClient):
        self.client = client

    @property
    def settings(self) -> tuple:
        """What changes the output: part of every cache key."""
        return ("openai", self.PROMPT, self.client.params)

    def messages(self, text: str, target: str, source: str) -> list[dict]:
        prompt = self.PROMPT.format(source=language_name(source), target=language_name(target), text=text)
        return [{"role": "user", "content": prompt}]

    def translate(self, texts: Sequence[str], target: str, source: str = "en") -> list[str | TranslationError]:
        requests = ((str(i), self.messages(t, target, source)) for i, t in enumerate(texts))
        return [
            TranslationError(str(reply)) if isinstance(reply, LLMError) else reply.strip()
            for _, reply, _ in self.client.complete_many(requests)
        ]
