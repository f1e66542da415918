"""Quantization methods DuQuant is compared with, behind the same quantize_model entry."""
