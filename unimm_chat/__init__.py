"""unimm_chat: caption/VQA annotations merged per image into UniMM-Chat dialogues (Muffin), and their translation."""
