"""rlhfkit: train language models from fine-grained human feedback."""

__version__ = "0.1.0"
