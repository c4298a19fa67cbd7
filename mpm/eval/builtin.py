"""Importing this registers the built-in text scorers (each lives in its task's module). The image judges
(`clip_score`) register with mpm.eval.paint, which `mpm eval paint` imports: caption and VQA runs do not load
diffusers."""

import mpm.demo.scoring  # noqa: F401  world_attributes (the miniature world of `mpm demo`)
import mpm.eval.chair  # noqa: F401  chair
import mpm.eval.judge  # noqa: F401  llm_judge
import mpm.eval.metrics  # noqa: F401  cider, bleu4, vqa_accuracy, exact_match
