"""Shared fixtures of the pi0.5 policy tests."""

from __future__ import annotations

import pytest

from pytest_duquant.policies.pi05.policy import build_policy


@pytest.fixture(autouse=True)
def _no_external_tokenizer(monkeypatch, tmp_path_factory):
    """The tests use the checkpoint's own tokenizer, never one a developer's environment points at."""
    monkeypatch.delenv("OPENPI_TOKENIZER", raising=False)
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path_factory.mktemp("empty_openpi_home")))


@pytest.fixture(scope="module")
def dummy():
    """The dummy pi0.5 policy, seed 5 (openpi LIBERO slots: base, left wrist, empty right wrist)."""
    return build_policy("dummy", seed=5)
