"""scripts/host_time.py (docs/speed.md "Serving"): the host-side time of a fast-path call, both ways."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "host_time.py"


def _script():
    spec = importlib.util.spec_from_file_location("host_time", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_ways_are_timed_and_written(tmp_path):
    mod = _script()
    out = tmp_path / "host.json"
    assert mod.main(["--batches", "1,3", "--calls", "3", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["way"]) for r in rows] == [(1, "host_float"), (1, "served"), (3, "host_float"),
                                                      (3, "served")]
    assert all(len(r["median_ms"]) == 2 and all(m > 0 for m in r["median_ms"]) for r in rows)


def test_the_stub_policy_serves_the_fast_path_without_device_work():
    mod = _script()
    policy = mod.stub_policy()
    from pytest_duquant.policies.pi05.processing import synthetic_observations

    actions = policy.raw_actions(synthetic_observations(3, seed=0, image_size=224), [0, 1, 2])
    assert policy.fast and actions.device.type == "meta"
    assert tuple(actions.shape) == (3, policy.config.action_horizon, policy.config.action_dim)


def test_bad_batches_are_a_usage_error(capsys):
    mod = _script()
    for bad in (["--batches", "1,x"], ["--batches", "0"]):
        try:
            mod.main(bad)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")
    assert "--batches '1,x': expected integers" in capsys.readouterr().err
