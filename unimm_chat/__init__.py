"""unimm_chat: caption/VQA annotations merged per image into UniMM-Chat dialogues (Muffin), and their translation.

`read_conversations(path)` is the one reader of conversation data (LLaVA JSON, UniMM-Chat jsonl, ShareGPT /
LLaMA-Factory messages, dataset folders) into `Conversation(id, images, messages, lang)`; the trainers use it.
"""

from unimm_chat.conversations import Conversation, Message, read_conversations

__all__ = ["Conversation", "Message", "read_conversations"]
