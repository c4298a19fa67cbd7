"""t2i: the text-to-image MPM model (VisCPM-Paint): a diffusion model conditioned on a multilingual LLM.

    pipeline   MPMPaintPipeline (diffusers) and TextProjection, its LLM -> UNet bridge; from_parts
    scoring    ImageTextScorer: CLIP / SigLIP-style image-text scores (ranking candidates, the sharder filter)
    recipe     `mpm train t2i`: English pairs, the LLM frozen (config in t2i/config.py)

Importing `t2i` is enough for `MPMPaintPipeline.from_pretrained(folder)`: the pipeline's model_index.json names
this package's classes.
"""

from t2i.pipeline import MPMPaintPipeline, TextProjection

__all__ = ["MPMPaintPipeline", "TextProjection"]
