"""mpm.eval: cross-lingual transfer measured per language (`mpm eval ...`).

languages   the language table: codes, prompts written in each language, fastText labels, tokenizers
text        one tokenizer per language (characters for zh / ja / th, words elsewhere; jieba, PTB as options)
metrics     CIDEr-D (pycocoevalcap), BLEU-4 (sacrebleu), VQA accuracy, exact match: registered scorers
fidelity    did the model answer in the language it was asked in? (fastText lid.176, line by line)
scorers     the scorer registry: `--metric NAME` or `--metric package.module:Class`
data        reading benchmarks (Crossmodal-3600, generic jsonl, VQAv2) and predictions
generative  per-language scoring of generated text (captioning, VQA), with fidelity and transfer ratios
caption, vqa, chair, mmbench, judge, paint    the tasks
report      results.json, items.jsonl, table.md, chart.png; comparing runs
"""
