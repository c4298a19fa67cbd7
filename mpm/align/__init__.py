"""Preference alignment of i2t models: DPO and dense DPO from corrections (RLHF-V), the AI-feedback loop (RLAIF-V).

data.py       preference pairs from every supported format into one type (`PreferencePair`)
losses.py     the DPO / DDPO formulas, and the corrected-segment weights from a token diff
batches.py    pairs as model inputs, and the per-token log-probs of their answers
reference.py  the reference model's log-probs, computed once and cached beside the data
config.py     `mpm train align`'s config (the loop: mpm/recipes/align.py)
best_of.py    best-of-N at inference with DPO's implicit reward (`mpm chat --best-of`)
claims.py     RLAIF-V: answers split into claims, claims into yes/no questions (rule or LLM splitter)
labeler.py    RLAIF-V: a labeler model's P(yes) against P(no) for each question
pairs.py      RLAIF-V: answer scores, preference pairs and the length-balancing sweep
"""
