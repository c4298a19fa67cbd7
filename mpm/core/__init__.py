"""mpm.core: the foundation every package builds on, importing nothing else from this project.

    config   typed dataclass configs from YAML, flags and dotted overrides (`load_config`)
    errors   `UserError` and its kinds: the errors a user can cause and fix
    files    atomic writes (temporary name, fsync, rename)
    images   opening any image upright in RGB, with the decompression-bomb guard
    runs     checkpoints with keep-last, the metrics log, resume checks, the resolved config beside outputs
    skips    counting skipped samples exactly while logging only some of them
    http     the OpenAI-compatible chat client and its reply cache
    llm      loading the multilingual LLM and its tokenizer (image-to-text and text-to-image share it)

Import the module you need (`from mpm.core.config import load_config`); this file imports nothing, so that a
sharder worker does not load torch.
"""
