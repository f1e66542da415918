"""Golden LIBERO rollouts: does the quantized pi0.5 keep its success rate?

    pytest -m libero --ckpt $CKPT --duquant-preset=B                 # judge preset B against the golden
    pytest -m libero --ckpt $CKPT --duquant-update-golden            # write the golden from an FP run

The quantized policy runs the suite's episodes under openpi's protocol (resumable results JSONL in
--libero-results); the gate (pytest_duquant.gate) compares them, paired episode by episode, with the FP
reference run stored in golden/libero/<fingerprint>/<suite>.json. The test fails only when the gate
declares a regression (the drop exceeds the golden's allowed drop for the preset at level alpha).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.libero


def _policy_factory(duquant_ckpt, config, opts):
    from pytest_duquant.libero.policy import PolicyUnavailableError, pi05_policy_factory

    try:
        return pi05_policy_factory(
            duquant_ckpt, config, tokenizer=opts.tokenizer, backend=opts.policy_backend,
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
        pytest.fail(
            f"LIBERO rollouts were requested but the simulator is not installed: {exc}", pytrace=False
        )


def _rollouts(factory, suite, opts, label, seed=7):
    from pytest_duquant.libero.harness import run_rollouts

    out = opts.results_dir / factory.fingerprint / f"{suite}_{label}.jsonl"
    summary = run_rollouts(
        factory, suite, _tasks(suite, opts), opts.trials, seed, opts.workers, out, backend=opts.backend
    )
    if not summary.complete:
        pytest.fail(
            f"{out}: only {len(summary.records)} of {summary.requested} episodes recorded; rerun to resume",
            pytrace=False,
        )
    return out, summary


def test_libero_success_rate_vs_golden(
    libero_suite, duquant_ckpt, duquant_config, duquant_update_golden, libero_options, record_property
):
    if duquant_ckpt is None:
        pytest.skip("LIBERO golden rollouts need a pi0.5 LIBERO checkpoint: pass --ckpt DIR")
    from pytest_duquant import gate as gate_mod
    from pytest_duquant import golden_libero, results_io
    from pytest_duquant.libero.protocol import PROTOCOL, check_suite

    suite = check_suite(libero_suite)
    _require_simulator(suite)
    opts = libero_options

    if duquant_update_golden:
        factory = _policy_factory(duquant_ckpt, None, opts)  # the FP reference: nothing quantized
        out, summary = _rollouts(factory, suite, opts, "fp")
        golden = golden_libero.golden_from_results(
            results_io.read_results(out),
            suite=suite,
            protocol=PROTOCOL,
            seed=7,
            config={"preset": "fp", "tasks": _tasks(suite, opts), "trials": opts.trials, "results": str(out)},
        )
        path = golden_libero.golden_path(opts.golden_root, factory.fingerprint, suite)
        result = golden_libero.write_golden(path, golden, overwrite=True)
        print(f"\n{result.summary()}  (FP success {summary.successes}/{len(summary.records)})")
        record_property("golden", str(path))
        return

    if not duquant_config.enabled:
        pytest.skip(
            "preset fp quantizes nothing: choose a preset to judge (--duquant-preset=A|B|precision|speed), "
            "or write the golden with --duquant-update-golden"
        )
    factory = _policy_factory(duquant_ckpt, duquant_config, opts)
    try:
        path = golden_libero.find_golden(opts.golden_root, factory.fingerprint, suite)
        golden = golden_libero.read_golden(
            path, fingerprint=factory.fingerprint, protocol=PROTOCOL, suite=suite
        )
        allowed = golden.allowed_drop_for(duquant_config.preset)
    except golden_libero.GoldenError as exc:
        pytest.fail(f"LIBERO golden unusable: {exc}", pytrace=False)
    out, summary = _rollouts(factory, suite, opts, duquant_config.preset)
    candidate = results_io.outcomes(results_io.read_results(out))
    decision = gate_mod.gate(golden.outcomes(), candidate, allowed_drop=allowed, alpha=golden.alpha)
    record_property("gate", decision.to_dict())
    print(f"\n{suite} preset {duquant_config.preset}: {decision.explanation}")
    assert decision.verdict != gate_mod.REGRESSION, (
        f"{suite}: preset {duquant_config.preset} regresses against {path}: {decision.explanation}"
    )
