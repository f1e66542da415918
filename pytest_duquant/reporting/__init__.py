"""Figures and JSON summaries of runs (matplotlib, Agg; imported lazily)."""
