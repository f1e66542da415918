"""Progress lines for long phases: silent when short or when nobody listens; counts and durations otherwise."""

from pytest_duquant import progress
from pytest_duquant.config import from_env, replace
from pytest_duquant.quantize import quantize_model

from .expert_stack import ExpertShapedPolicy


def test_nothing_is_printed_without_a_listener_or_for_short_loops(monkeypatch):
    lines = []
    assert list(progress.steps(range(3), "x")) == [0, 1, 2]  # no listener
    with progress.reporting_to(lines.append):
        assert list(progress.steps(range(3), "short")) == [0, 1, 2]  # faster than EVERY_S
        with progress.phase("quick"):
            pass
    assert lines == []


def test_long_loops_and_phases_say_how_far_they_are(monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    lines = []
    with progress.reporting_to(lines.append):
        list(progress.steps(range(3), "calibration", unit="policy calls"))
        with progress.phase("loading /ckpt", announce=True):
            pass
    assert lines[0].startswith("[duquant] calibration: 1/3 policy calls (")
    assert lines[2].startswith("[duquant] calibration: 3/3 policy calls done in ")
    assert lines[3] == "[duquant] loading /ckpt ..." and lines[4].startswith("[duquant] loading /ckpt: done in ")


def test_quantize_model_reports_its_progress(monkeypatch, tmp_path):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    lines = []
    with progress.reporting_to(lines.append):
        quantize_model(ExpertShapedPolicy(), replace(from_env({}, preset="B"), packdir=str(tmp_path)))
    assert lines[-1].startswith("[duquant] DuQuant B: quantizing: 14/14 linears done in ")
