"""Policies the suites run. pi0.5 lives in `pytest_duquant.policies.pi05`; the names below are re-exported."""

from __future__ import annotations

_NAMES = (
    "Pi05Policy",
    "build_policy",
    "load_policy",
    "synthetic_observations",
    "CheckpointError",
    "Pi05Config",
)


def __getattr__(name):
    if name in _NAMES:
        from pytest_duquant.policies import pi05

        return getattr(pi05, name)
    raise AttributeError(name)


__all__ = list(_NAMES)
