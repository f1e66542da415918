from __future__ import annotations

import json

import pytest

from pytest_duquant.gate import clopper_pearson
from pytest_duquant.golden.episodes import golden_from_results
from pytest_duquant.reporting.success import plot_success, success_table, write_success_report
from pytest_duquant.results import EpisodeResult
from pytest_duquant.testing import make_records


def test_success_png_and_json_numbers(tmp_path):
    recs = []
    goldens = {}
    for suite, rate in (("libero_spatial", 0.95), ("libero_goal", 0.9)):
        fp = [
            EpisodeResult.from_dict(r)
            for r in make_records(suite=suite, tasks=10, trials=5, rate=rate)
        ]
        goldens[suite] = golden_from_results(fp)
        recs += fp
        for preset, r in (("B", rate - 0.1), ("speed", rate - 0.3)):
            recs += [
                EpisodeResult.from_dict(x)
                for x in make_records(
                    suite=suite, tasks=10, trials=5, rate=r, preset=preset, rng_seed=hash(preset) % 100
                )
            ]
    cells = success_table(recs, goldens)
    assert {(c.suite, c.preset) for c in cells} == {(s, p) for s in goldens for p in ("fp", "B", "speed")}
    png, js = tmp_path / "out" / "success.png", tmp_path / "out" / "success.json"
    data = plot_success(cells, png, js)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    saved = json.loads(js.read_text())
    assert saved == json.loads(json.dumps(data))
    by = {(c["suite"], c["preset"]): c for c in saved["cells"]}
    for suite, g in goldens.items():
        for preset in ("fp", "B", "speed"):
            mine = [r for r in recs if r.suite == suite and (r.preset or "fp") == preset]
            k, n = sum(r.success for r in mine), len(mine)
            c = by[(suite, preset)]
            assert (c["successes"], c["episodes"]) == (k, n) and c["rate"] == pytest.approx(k / n)
            lo, hi = clopper_pearson(k, n, 0.95)
            assert c["ci_low"] == pytest.approx(lo) and c["ci_high"] == pytest.approx(hi)
            assert c["reference_rate"] == pytest.approx(g.success_rate)
        assert by[(suite, "B")]["threshold"] == pytest.approx(g.success_rate - 0.05)
        assert by[(suite, "speed")]["threshold"] == pytest.approx(g.success_rate - 0.08)
        assert by[(suite, "fp")]["threshold"] is None


def test_allowed_drop_override_and_no_golden(tmp_path):
    recs = [EpisodeResult.from_dict(r) for r in make_records(tasks=2, trials=5, preset="B")]
    cells = success_table(recs)
    assert cells[0].threshold is None and cells[0].reference_rate is None
    fp = [EpisodeResult.from_dict(r) for r in make_records(tasks=2, trials=5)]
    cells = success_table(recs, {"libero_spatial": golden_from_results(fp)}, allowed_drop={"B": 0.2})
    assert cells[0].threshold == pytest.approx(cells[0].reference_rate - 0.2)
    plot_success(cells, tmp_path / "s.png")
    assert (tmp_path / "s.png").exists()
    assert write_success_report([], None, tmp_path) is None
    paths = write_success_report(recs, None, tmp_path / "r")
    assert paths["png"].is_file() and paths["json"].is_file()
