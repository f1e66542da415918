"""Golden LIBERO rollouts: does the quantized pi0.5 keep its success rate?

    pytest -m libero --duquant-preset=B                              # the shipped reference policy, libero_object
    pytest -m libero --ckpt $CKPT --duquant-preset=B                 # judge preset B against the golden
    pytest -m libero --ckpt $CKPT --duquant-update-golden            # write the golden from an FP run
    pytest -m libero --ckpt $CKPT --duquant-preset=B --libero-tasks 0-9 --libero-trials 2 \
        --duquant-allowed-drop 0.2                                    # a 20-episode smoke gate
    pytest -m libero ... --duquant-same-machine                      # FP arm in the same job, golden = drift check

The quantized policy runs the planned episodes (--libero-tasks x --libero-trials) under openpi's protocol
(resumable results JSONL in --libero-results); the plugin's duquant_success_regression judges them with
pytest_duquant.judge, the same call as `duquant gate`, paired episode by episode with the FP reference in
golden/libero/<fingerprint>/<suite>.json. The test passes only on a PASS (the drop shown below the allowed
drop); REGRESSION, INCONCLUSIVE (with how many more episodes would decide) and an incomplete run fail.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.libero


def _policy_factory(duquant_ckpt, config, opts):
    from pytest_duquant.libero.policy import PolicyUnavailableError, pi05_policy_factory

    try:
        return pi05_policy_factory(
            duquant_ckpt,
            config,
            tokenizer=opts.tokenizer,
            backend=opts.policy_backend,
            calibration=opts.calibration,
        )
    except PolicyUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)


def _tasks(suite, opts):
    from pytest_duquant.libero.protocol import SUITE_TASKS, parse_ids

    return parse_ids(opts.tasks, n=SUITE_TASKS[suite], what="--libero-tasks")


def _require_simulator(suite):
    from pytest_duquant.libero import sim_setup

    try:
        sim_setup.libero_package_root()
        sim_setup.check_suite_assets(suite)
    except sim_setup.LiberoSetupError as exc:  # selected explicitly with -m libero: a failure, not a skip
        pytest.fail(f"LIBERO rollouts were requested but the simulator is not installed: {exc}", pytrace=False)


def _rollouts(factory, suite, opts, label, seed=7):
    from pytest_duquant.libero.harness import run_rollouts
    from pytest_duquant.results import read_results

    out = opts.results_dir / factory.fingerprint / f"{suite}_{label}.jsonl"
    summary = run_rollouts(
        factory, suite, _tasks(suite, opts), opts.trials, seed, opts.workers, out, backend=opts.backend
    )
    if not summary.complete:
        pytest.fail(
            f"{out}: only {len(summary.records)} of {summary.requested} episodes recorded; rerun to resume",
            pytrace=False,
        )
    return read_results(out), summary


def test_libero_success_rate_vs_golden(
    request,
    libero_suite,
    libero_ckpt,
    duquant_config,
    duquant_update_golden,
    duquant_success_regression,
    libero_options,
    record_property,
):
    from pytest_duquant.libero.protocol import check_suite

    duquant_ckpt = libero_ckpt
    suite = check_suite(libero_suite)
    _require_simulator(suite)
    opts = libero_options
    plan = {"tasks": _tasks(suite, opts), "trials": list(range(opts.trials))}

    if duquant_update_golden:
        factory = _policy_factory(duquant_ckpt, None, opts)  # the FP reference: nothing quantized
        records, summary = _rollouts(factory, suite, opts, "fp")
        result = duquant_success_regression.check(records, suite, config={"preset": "fp", **plan}, **plan)
        print(f"\n{result.summary()}  (FP success {summary.successes}/{len(summary.records)})")
        record_property("golden", str(result.path))
        return

    if not duquant_config.enabled:
        pytest.skip(
            "preset fp quantizes nothing: choose a preset to judge (--duquant-preset=A|B|precision|speed), "
            "or write the golden with --duquant-update-golden"
        )
    reference = None
    if request.config.getoption("--duquant-same-machine"):
        reference, _ = _rollouts(_policy_factory(duquant_ckpt, None, opts), suite, opts, "fp")
    records, _ = _rollouts(_policy_factory(duquant_ckpt, duquant_config, opts), suite, opts, duquant_config.preset)
    judgement = duquant_success_regression.check(
        records, suite, preset=duquant_config.preset, reference=reference, **plan
    )
    record_property("judgement", judgement.to_dict())
    print(f"\n{judgement.text()}")
