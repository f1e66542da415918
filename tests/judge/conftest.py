"""A golden root with one LIBERO suite and writers of candidate runs (synthetic, no simulator)."""

from __future__ import annotations

import pytest

from pytest_duquant.golden.episodes import golden_from_results, path_for, write
from pytest_duquant.results import EpisodeResult
from pytest_duquant.testing import make_records, write_jsonl


class Setup:
    def __init__(self, tmp_path, tasks=10, trials=10, rate=0.95, rng_seed=3, suite="libero_spatial"):
        self.tmp = tmp_path
        self.root = tmp_path / "golden"
        fp = make_records(suite=suite, tasks=tasks, trials=trials, rate=rate, rng_seed=rng_seed)
        self.golden = golden_from_results([EpisodeResult.from_dict(r) for r in fp])
        self.path = write(path_for(self.root, self.golden.fingerprint, suite), self.golden).path
        self.ref = self.golden.outcomes()
        self.tasks, self.trials, self.suite = tasks, trials, suite

    def outcomes(self, flip=0, gain=0):
        """The golden's outcomes with the first `flip` successes failed and the first `gain` failures won."""
        out = dict(self.ref)
        for k in [k for k, v in self.ref.items() if v][:flip]:
            out[k] = False
        for k in [k for k, v in self.ref.items() if not v][:gain]:
            out[k] = True
        return out

    def candidate(self, name="cand.jsonl", flip=0, gain=0, keep=None, extra=(), **kw):
        """Write a candidate run; keep(records) -> the records that finished (a killed run)."""
        recs = make_records(
            suite=self.suite, tasks=self.tasks, trials=self.trials, preset=kw.pop("preset", "B"),
            outcomes=self.outcomes(flip, gain), **kw,
        )
        recs = (keep(recs) if keep else recs) + list(extra)
        return write_jsonl(self.tmp / name, recs)


@pytest.fixture
def setup(tmp_path):
    return Setup(tmp_path)


@pytest.fixture(autouse=True)
def _design_cache(tmp_path, monkeypatch):
    """Sequential designs go to a temporary cache, not the user's."""
    monkeypatch.setenv("PYTEST_DUQUANT_CACHE", str(tmp_path / "cache"))
