"""Typed configuration of `mpm unimm build` and `mpm unimm translate` (filled by mpm.core.config.load_config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dataproc.langid import LID176_LANGUAGES
from dataproc.translate import LANGUAGES
from mpm.core.config import check_choice, check_range
from mpm.core.errors import ConfigError

GENERATORS = ("template", "hf", "openai")
BACKENDS = ("hf", "openai")


@dataclass
class SourcesConfig:
    coco_captions: str | None = None  # captions_train2017.json
    vqav2_questions: str | None = None  # v2_OpenEnded_mscoco_train2014_questions.json
    vqav2_annotations: str | None = None  # v2_mscoco_train2014_annotations.json
    okvqa_questions: str | None = None  # OpenEnded_mscoco_train2014_questions.json (OK-VQA)
    okvqa_annotations: str | None = None  # mscoco_train2014_annotations.json (OK-VQA)
    aokvqa: str | None = None  # aokvqa_v1p0_train.json
    visdial: str | None = None  # visdial_1.0_train.json


@dataclass
class HFGeneratorConfig:
    model: str = ""  # a local folder or a hub id
    batch_size: int = 4
    max_new_tokens: int = 1024
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    device: str = "auto"  # auto = cuda if available, else cpu
    trust_remote_code: bool = False


@dataclass
class OpenAIConfig:
    base_url: str = "http://127.0.0.1:8000/v1"  # any OpenAI-compatible server (vLLM, llama.cpp, hosted)
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable, never from a file
    concurrency: int = 8
    retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    temperature: float = 0.7
    max_tokens: int = 1024

    def __post_init__(self):
        check_range("openai.concurrency", self.concurrency, 1)
        check_range("openai.retries", self.retries, 0)
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"`openai.base_url` must start with http:// or https://, got {self.base_url!r}")


@dataclass
class BuildConfig:
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    output: str = ""
    generator: str = "template"
    seed: int = 0
    max_turns: int = 10  # user-assistant exchanges per dialogue (UniMM-Chat averages 9.89)
    min_turns: int = 2  # shorter dialogues are rejected (too_short)
    min_vqa_agreement: float = 0.3  # VQA questions whose majority answer fewer annotators gave are left out
    image_pattern: str = "{image_id:012d}.jpg"  # the `image` of each conversation (COCO 2017 file names)
    hf: HFGeneratorConfig = field(default_factory=HFGeneratorConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)

    def __post_init__(self):
        check_choice("generator", self.generator, GENERATORS)
        check_range("max_turns", self.max_turns, 1)
        check_range("min_turns", self.min_turns, 1, self.max_turns)
        check_range("min_vqa_agreement", self.min_vqa_agreement, 0, 1)
        try:
            self.image_pattern.format(image_id=1, file_name="x.jpg")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"`image_pattern` {self.image_pattern!r} is not a format string over image_id and file_name ({exc})"
            ) from None

    def check_required(self) -> None:
        if not self.output:
            raise ConfigError("no output folder: pass --output DIR")
        if self.generator == "hf" and not self.hf.model:
            raise ConfigError("--generator hf needs --model PATH_OR_ID (hf.model)")
        if self.generator == "openai" and not self.openai.model:
            raise ConfigError("--generator openai needs --model NAME (openai.model) and --base-url")


@dataclass
class HFTranslatorConfig:
    batch_size: int = 16
    max_new_tokens: int = 512
    num_beams: int = 1
    device: str = "auto"


@dataclass
class TranslateConfig:
    input: str = ""  # conversations (LLaVA JSON, UniMM-Chat jsonl, ShareGPT, or a dataset folder)
    output: str = ""
    langs: list[str] = field(default_factory=list)  # target languages (ISO 639-1), e.g. [zh, de]
    source_lang: str = "en"
    backend: str = "hf"  # hf: NLLB / M2M100 / Marian through transformers; openai: a chat endpoint
    model: str = ""  # hf: a folder or hub id; openai: the model name
    min_lang_score: float = 0.5  # fastText score the translated conversation must reach in its target language
    hf: HFTranslatorConfig = field(default_factory=HFTranslatorConfig)
    openai: OpenAIConfig = field(default_factory=lambda: OpenAIConfig(temperature=0.0))

    def __post_init__(self):
        check_choice("backend", self.backend, BACKENDS)
        self.langs = [lang.strip().lower() for lang in self.langs if lang.strip()]
        unknown = [
            lang for lang in [*self.langs, self.source_lang] if lang not in LANGUAGES or lang not in LID176_LANGUAGES
        ]
        if unknown:
            raise ConfigError(
                f"unknown language codes {unknown}: use ISO 639-1 codes translation knows: {', '.join(sorted(LANGUAGES))}"
            )
        check_range("min_lang_score", self.min_lang_score, 0, 1)

    def check_required(self) -> None:
        for name, flag in (("input", "--input"), ("output", "--output"), ("model", "--model")):
            if not getattr(self, name):
                raise ConfigError(f"missing {flag}")
        if not self.langs:
            raise ConfigError("no target language: pass --langs zh,de,...")
        if self.source_lang in self.langs:
            raise ConfigError(f"--langs includes the source language {self.source_lang!r}")
