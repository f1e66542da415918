"""The one exception for bad pi0.5 checkpoints, tokenizers and observations."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint, tokenizer or input is unusable; the message names the file/key, expected vs found."""
