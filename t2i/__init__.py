"""t2i: the text-to-image MPM model (VisCPM-Paint): a diffusion model conditioned on a multilingual LLM."""
