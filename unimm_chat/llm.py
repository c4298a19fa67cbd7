"""LLM dialogue generators: a local transformers chat model (`hf`) or an OpenAI-compatible endpoint (`openai`).

Both send the same prompt (the image's merged annotations and strict output rules; Muffin never released its
prompt, so this one is ours) and parse the same output format: one JSON object
    {"conversation": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}
Anything else is rejected with a reason (`unparseable`, `prompt_echo`, `llm_error`); parsed dialogues then go
through unimm_chat.validate like the template generator's. Responses are cached on disk (dataproc.llm_client), so
a killed run resumes without asking again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from dataproc.llm_client import ChatClient, LLMError, ResponseCache
from unimm_chat.config import HFGeneratorConfig, OpenAIConfig
from unimm_chat.conversations import FROM_TO_ROLE, IMAGE_TOKEN, Conversation, Message
from unimm_chat.sources import ImageRecord

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


def annotations_text(record: ImageRecord) -> str:
    lines = [ANNOTATION_START]
    if record.captions:
        lines.append("Captions:")
        lines += [f"- {c}" for c in record.captions]
    if record.qas:
        lines.append("Questions and answers:")
        for qa in record.qas:
            line = f"- Q: {qa.question} A: {qa.answer}"
            if qa.rationales:
                line += f" (reasoning: {qa.rationales[0]})"
            lines.append(line)
    lines.append(ANNOTATION_END)
    return "\n".join(lines)


def build_prompt(record: ImageRecord, min_turns: int, max_turns: int) -> list[dict]:
    user = f"{annotations_text(record)}\n\n{RULES.format(min_turns=min_turns, max_turns=max_turns)}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


def parse_dialogue(text: str) -> list[Message]:
    """The model's reply -> messages, with <image> at the start of the first user turn. Raises ParseError."""
    stripped = _FENCE.sub("", text.strip()).strip()
    if ANNOTATION_START in stripped or "Rules:" in stripped or SYSTEM_PROMPT[:40] in stripped:
        raise ParseError("prompt_echo", f"the reply repeats the prompt: {stripped[:80]!r}")
    start = min((i for i in (stripped.find("{"), stripped.find("[")) if i >= 0), default=-1)
    end = max(stripped.rfind("}"), stripped.rfind("]"))
    if start < 0 or end <= start:
        raise ParseError("unparseable", f"no JSON in the reply: {stripped[:80]!r}")
    try:
        obj = json.loads(stripped[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ParseError("unparseable", f"invalid or truncated JSON ({exc.msg} at {exc.pos})") from None
    turns = obj.get("conversation") if isinstance(obj, dict) else obj
    if not isinstance(turns, list) or not turns:
        raise ParseError("unparseable", "no 'conversation' list in the JSON")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in FROM_TO_ROLE:
            raise ParseError("unparseable", f"turn {i} is not {{'from': 'human'|'gpt', 'value': text}}: {turn!r:.80}")
        messages.append(Message(FROM_TO_ROLE[turn["from"]], turn["value"].strip()))
    if messages[0].role == "user":  # the model is not trusted to place the image marker: we put it first
        messages[0].content = f"{IMAGE_TOKEN}\n{messages[0].content.replace(IMAGE_TOKEN, '').strip()}"
    return messages


def to_conversation(record: ImageRecord, reply: str, image: str) -> Conversation:
    return Conversation(f"{record.image_id:012d}", [image], parse_dialogue(reply), "en")


GenerationResult = tuple[ImageRecord, "str | LLMError", bool]  # (record, reply or error, came from the cache)


class OpenAIGenerator:
    name = "openai"

    def __init__(self, cfg: OpenAIConfig, min_turns: int, max_turns: int, cache: ResponseCache):
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
        self.min_turns, self.max_turns, self.cache = min_turns, max_turns, cache

    def replies(self, records: list[ImageRecord]) -> Iterator[GenerationResult]:
        def requests():
            for record in records:
                messages = build_prompt(record, self.min_turns, self.max_turns)
                yield self.client.cache_key(messages, tag=f"image {record.image_id}"), messages

        for record, (_, reply, cached) in zip(records, self.client.complete_many(requests(), self.cache)):
            yield record, reply, cached


class HFGenerator:
    """A local chat model through transformers, batched, with left padding."""

    name = "hf"

    def __init__(self, cfg: HFGeneratorConfig, min_turns: int, max_turns: int, cache: ResponseCache):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.min_turns, self.max_turns, self.cache = cfg, min_turns, max_turns, cache
        self.torch = torch
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype="auto", trust_remote_code=cfg.trust_remote_code
        ).to(device)
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
            prompts = [build_prompt(r, self.min_turns, self.max_turns) for r in batch]
            keys = [self._key(p, r) for p, r in zip(prompts, batch)]
            cached = [self.cache.get(k) for k in keys]
            todo = [i for i, c in enumerate(cached) if c is None]
            if todo:
                enc = self.tokenizer([self._text(prompts[i]) for i in todo], return_tensors="pt", padding=True).to(
                    self.device
                )
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
                    self.cache.put(keys[i], text)
                    cached[i] = text
            for i, record in enumerate(batch):
                yield record, cached[i], i not in todo
