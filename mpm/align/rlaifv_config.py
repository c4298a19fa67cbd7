"""Typed configuration of `mpm align rlaifv` (YAML in configs/align/rlaifv_*.yaml; the loop: mpm/align/rlaifv.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpm.align.claims import SPLITTERS
from mpm.align.config import LossSection, ReferenceSection, TrainSection
from mpm.core.config import check_choice, check_range
from mpm.core.errors import ConfigError


@dataclass
class SamplingSection:
    """Step 1: N answers per instruction from the current policy, the same decoding settings, different seeds."""

    n: int = 10  # RLAIF-V: --repeat 10
    temperature: float = 0.7  # RLAIF-V: 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512  # RLAIF-V: max_tokens 512
    batch_size: int = 8

    def __post_init__(self):
        check_range("sampling.n", self.n, 2)  # one answer per instruction cannot make a pair
        check_range("sampling.temperature", self.temperature, 1e-6)
        check_range("sampling.top_p", self.top_p, 1e-6, 1.0)
        check_range("sampling.max_new_tokens", self.max_new_tokens, 1)
        check_range("sampling.batch_size", self.batch_size, 1)


@dataclass
class EndpointSection:
    """An OpenAI-compatible chat endpoint (vLLM, llama.cpp server, a hosted API) as the claim splitter."""

    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable holding the key, if any
    concurrency: int = 8
    temperature: float = 0.2  # RLAIF-V's split model samples at 0.2
    max_tokens: int = 512
    retries: int = 4  # a request failing this many more times stops the loop (its message shown; replies cached)


@dataclass
class SplitterSection:
    """Steps 2-3: answers into atomic claims, claims into yes/no questions (mpm.align.claims)."""

    kind: str = "rule"  # rule (offline, per-language clause splitting) | llm (a local model or an endpoint)
    model: str | None = None  # llm: a local causal LM (folder or hub id) ...
    endpoint: EndpointSection = field(default_factory=EndpointSection)  # ... or an endpoint (base_url set)
    questions: str = "llm"  # llm: the model rewrites each claim as a question (RLAIF-V's changeq); template
    max_new_tokens: int = 256  # a local model's reply length
    batch_size: int = 16  # answers per splitter call
    rules: str | None = None  # another folder of claims/<lang>.yaml (default: configs/align/claims)

    def __post_init__(self):
        check_choice("splitter.kind", self.kind, SPLITTERS)
        check_choice("splitter.questions", self.questions, ("llm", "template"))
        check_range("splitter.batch_size", self.batch_size, 1)
        if self.kind == "llm" and bool(self.model) == bool(self.endpoint.base_url):
            raise ConfigError(
                "splitter.kind llm needs exactly one of splitter.model (a local causal LM) and "
                "splitter.endpoint.base_url (an OpenAI-compatible endpoint)"
            )
        if self.kind == "llm" and self.endpoint.base_url and not self.endpoint.model:
            raise ConfigError("splitter.endpoint.model is required with splitter.endpoint.base_url (the served model)")


@dataclass
class LabelerSection:
    """Step 4: the MLLM that answers each claim's yes/no question (mpm.align.labeler)."""

    model: str | None = None  # an MPM or LLaVA checkpoint; None: the policy itself (self-feedback, as RLAIF-V 12B)
    batch_size: int = 16  # questions per forward pass
    yes_no: str | None = None  # another yes/no token table (default: configs/align/yes_no.yaml)

    def __post_init__(self):
        check_range("labeler.batch_size", self.batch_size, 1)


@dataclass
class PairsSection:
    """Step 5 (mpm.align.pairs): pairs with a score gap, a few per instruction, then the length sweep."""

    min_gap: int = 1  # RLAIF-V: |score_a - score_b| >= 1
    max_per_instruction: int = 2  # RLAIF-V: sample_num 2

    def __post_init__(self):
        check_range("pairs.min_gap", self.min_gap, 1)
        check_range("pairs.max_per_instruction", self.max_per_instruction, 1)


@dataclass
class DpoData:
    max_length: int = 2048  # a pair longer than this is skipped, counted

    def __post_init__(self):
        check_range("dpo.data.max_length", self.max_length, 8)


@dataclass
class DpoSection:
    """Step 6: `mpm train align` on the iteration's pairs, from the current policy (which is also the reference).
    train.output_dir and train.max_steps are set by the loop (the steps from `epochs`)."""

    epochs: float = 4.0  # RLAIF-V: 4 epochs per iteration
    warmup_ratio: float = 0.05  # RLAIF-V: warmup 0.05 of the steps (train.warmup_steps is set from it)
    data: DpoData = field(default_factory=DpoData)
    loss: LossSection = field(default_factory=LossSection)  # RLAIF-V: plain DPO, beta 0.1 (the `dpo` preset)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        check_range("dpo.epochs", self.epochs, 1e-6)
        check_range("dpo.warmup_ratio", self.warmup_ratio, 0.0, 1.0)


@dataclass
class RlaifvConfig:
    policy: str = ""  # the starting MPM checkpoint
    instructions: str = ""  # jsonl {"id", "image", "question", "lang"}: what the policy answers each iteration
    heldout: str = ""  # the same schema, other images: the hallucination metric that picks the next policy
    images: str | None = None  # where relative image paths live (default: beside each file)
    # A policy trained on raw prompts (no chat template): the prompt with `{question}` and `<image>` (as
    # `mpm train align`'s data.raw_prompt). None: the chat template.
    raw_prompt: str | None = None
    output_dir: str = ""
    iterations: int = 4  # RLAIF-V: 4
    seed: int = 0
    sampling: SamplingSection = field(default_factory=SamplingSection)
    splitter: SplitterSection = field(default_factory=SplitterSection)
    labeler: LabelerSection = field(default_factory=LabelerSection)
    pairs: PairsSection = field(default_factory=PairsSection)
    dpo: DpoSection = field(default_factory=DpoSection)

    def __post_init__(self):
        check_range("iterations", self.iterations, 1)
        if self.raw_prompt is not None and "{question}" not in self.raw_prompt:
            raise ConfigError(f"raw_prompt {self.raw_prompt!r} has no {{question}}: put it where the question goes")

    def check_required(self) -> None:
        for key in ("policy", "instructions", "heldout", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required (see configs/align/rlaifv_rule.yaml)")


# Settings a rerun may change: how many iterations, how fast, where; and DPO's (an iteration's dpo/ folder guards
# its own run: `mpm train align` refuses to resume its checkpoints with other settings). Not sampling.batch_size:
# a batch's seed depends on where it starts.
RESUMABLE = ("iterations", "output_dir", "splitter.batch_size", "splitter.endpoint.concurrency",
             "splitter.endpoint.retries", "labeler.batch_size", "dpo")  # fmt: skip
