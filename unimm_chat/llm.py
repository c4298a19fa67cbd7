"""LLM dialogue generators: a local transformers chat model (`hf`) or an OpenAI-compatible endpoint (`openai`).

Both send the same prompt (the image's merged annotations and strict output rules; Muffin never released its
prompt, so this one is ours) and parse the same output format: one JSON object
    {"conversation": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}
Anything else is rejected with a reason (`unparseable`, `prompt_echo`, `llm_error`); parsed dialogues then go
through unimm_chat.validate like the template generator's. Responses are cached on disk (mpm.core.http), so
a killed run resumes without asking again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from mpm.core.errors import model_errors
from mpm.core.http import ChatClient, LLMError, ResponseCache
from unimm_chat.config import HFGeneratorConfig, OpenAIConfig
from unimm_chat.conversations import FROM_TO_ROLE, IMAGE_TOKEN, Conversation, Message
from unimm_chat.sources import ImageRecord, usable_qas

SYSTEM_PROMPT = (
    "You write training conversations for a multimodal assistant. You are given the annotations of one image: "
    "human-written captions and question-answer pairs, some with the reasoning behind the answer. Write a natural, "
    "knowledge-rich conversation between a user and an assistant who can SEE the image."
)
RULES = """Rules:
- The user starts; user and assistant alternate; between {min_turns} and {max_turns} exchanges.
- The assistant answers as if looking at the picture. Never mention captions, annotations, annotators, questions
  you were given, or any data: only what is visible and what one can reason from it.
- Use only the facts in the annotations. When the user asks one of the listed questions, the answer must agree
  with the given answer. Use the reasoning to explain answers where it helps.
- Vary the questions: details, counts, colours, positions, activities, and knowledge the picture calls for.
- Output ONLY this JSON object, nothing before or after it:
  {{"conversation": [{{"from": "human", "value": "..."}}, {{"from": "gpt", "value": "..."}}]}}"""
ANNOTATION_START, ANNOTATION_END = "<annotations>", "</annotations>"


class ParseError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def annotations_text(record: ImageRecord, min_vqa_agreement: float) -> str:
    lines = [ANNOTATION_START]
    if record.captions:
        lines.append("Captions:")
        lines += [f"- {c}" for c in record.captions]
    qas = usable_qas(record.qas, min_vqa_agreement)  # as the template generator and the validator do
    if qas:
        lines.append("Questions and answers:")
        for qa in qas:
            line = f"- Q: {qa.question} A: {qa.answer}"
            if qa.rationales:
                line += f" (reasoning: {qa.rationales[0]})"
            lines.append(line)
    lines.append(ANNOTATION_END)
    return "\n".join(lines)


def build_prompt(record: ImageRecord, min_turns: int, max_turns: int, min_vqa_agreement: float) -> list[dict]:
    user = f"{annotations_text(record, min_vqa_agreement)}\n\n{RULES.format(min_turns=min_turns, max_turns=max_turns)}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)  # reasoning models think out loud before answering
_DECODER = json.JSONDecoder()


def _turns_of(obj) -> list | None:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in ("conversation", "conversations", "messages"):
            if isinstance(obj.get(key), list):
                return obj[key]
    return None


def parse_dialogue(text: str) -> list[Message]:
    """The model's reply -> messages, with <image> at the start of the first user turn. Raises ParseError.

    The first JSON object in the reply holding a "conversation" (or "conversations"/"messages") list is used,
    whatever text surrounds it; turns may be {"from", "value"} or {"role", "content"}.
    """
    reply = _THINK.sub("", text).strip()
    if ANNOTATION_START in reply:  # our prompt's own marker: the model echoed the prompt (and its example JSON)
        raise ParseError("prompt_echo", f"the reply repeats the prompt: {reply[:80]!r}")
    turns = None
    for start in (i for i, ch in enumerate(reply) if ch in "{["):
        try:
            obj, _ = _DECODER.raw_decode(reply, start)
        except json.JSONDecodeError:
            continue
        turns = _turns_of(obj)
        if turns:
            break
    if not turns:
        raise ParseError(
            "unparseable", f"no JSON conversation in the reply (invalid, truncated or missing): {reply[:80]!r}"
        )
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if not isinstance(role, str) or role not in FROM_TO_ROLE or not isinstance(content, str):
            raise ParseError("unparseable", f"turn {i} is not {{'from': 'human'|'gpt', 'value': text}}: {turn!r:.80}")
        content = content.encode("utf-8", "replace").decode("utf-8").strip()  # lone surrogates cannot be written
        messages.append(Message(FROM_TO_ROLE[role], content))
    if messages[0].role == "user":  # the model is not trusted to place the image marker: we put it first
        messages[0].content = f"{IMAGE_TOKEN}\n{messages[0].content.replace(IMAGE_TOKEN, '').strip()}"
    return messages


def to_conversation(record: ImageRecord, reply: str, image: str) -> Conversation:
    return Conversation(f"{record.image_id:012d}", [image], parse_dialogue(reply), "en")


# (record, cache key, reply or error, came from the cache). The build caches a reply only once it is accepted.
GenerationResult = tuple[ImageRecord, str, "str | LLMError", bool]


class OpenAIGenerator:
    name = "openai"

    def __init__(self, cfg: OpenAIConfig, build, cache: ResponseCache):
        self.client = ChatClient(
            cfg.base_url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
            backoff_s=cfg.backoff_s,
            concurrency=cfg.concurrency,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
        )
        self.build, self.cache = build, cache

    def replies(self, records: list[ImageRecord]) -> Iterator[GenerationResult]:
        b = self.build

        def requests():
            for record in records:
                messages = build_prompt(record, b.min_turns, b.max_turns, b.min_vqa_agreement)
                yield self.client.cache_key(messages, tag=f"image {record.image_id}"), messages

        for record, (key, reply, cached) in zip(records, self.client.complete_many(requests(), self.cache)):
            yield record, key, reply, cached


class HFGenerator:
    """A local chat model through transformers, batched, with left padding."""

    name = "hf"

    def __init__(self, cfg: HFGeneratorConfig, build, cache: ResponseCache):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.build, self.cache = cfg, build, cache
        self.torch = torch
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        with model_errors("hf.model", cfg.model):
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype="auto", trust_remote_code=cfg.trust_remote_code
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(device)
        self.model.eval()
        self.device = device

    def _text(self, messages: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A base model without a chat template: a plain transcript it can continue.
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"

    def _key(self, messages: list[dict], record: ImageRecord) -> str:
        cfg = self.cfg
        return ResponseCache.key(
            "hf", cfg.model, cfg.max_new_tokens, cfg.temperature, cfg.top_p, messages, record.image_id
        )

    def replies(self, records: list[ImageRecord]) -> Iterator[GenerationResult]:
        cfg = self.cfg
        for start in range(0, len(records), cfg.batch_size):
            batch = records[start : start + cfg.batch_size]
            b = self.build
            prompts = [build_prompt(r, b.min_turns, b.max_turns, b.min_vqa_agreement) for r in batch]
            keys = [self._key(p, r) for p, r in zip(prompts, batch)]
            cached = [self.cache.get(k) for k in keys]
            todo = [i for i, c in enumerate(cached) if c is None]
            if todo:
                prompt_texts = [self._text(prompts[i]) for i in todo]
                # A chat template already writes the special tokens (BOS included): do not add them twice.
                enc = self.tokenizer(
                    prompt_texts, return_tensors="pt", padding=True, add_special_tokens=not self.tokenizer.chat_template
                ).to(self.device)
                with self.torch.no_grad():
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=cfg.max_new_tokens,
                        do_sample=cfg.temperature > 0,
                        temperature=cfg.temperature if cfg.temperature > 0 else None,
                        top_p=cfg.top_p if cfg.temperature > 0 else None,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(todo, texts):
                    cached[i] = text
            for i, record in enumerate(batch):
                yield record, keys[i], cached[i], i not in todo
