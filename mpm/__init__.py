"""mpm: the image-to-text MPM model, its training recipes, chat, evaluation, and the `mpm` command line."""

__version__ = "0.1.0"
