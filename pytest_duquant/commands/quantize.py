"""`duquant quantize`: the main job. Quantize a pi0.5 policy under a preset and report per-layer error.

Without --ckpt it uses the embedded default: the reference policy shipped with the package (a small
pi0.5-family policy trained here on LIBERO demonstrations; docs/reference.md), calibrated on its own
calibration.npz (real LIBERO frames). Prints the plan, the per-layer table (SQNR of DuQuant vs plain RTN
on real calibration inputs), the action error vs the FP policy and the bytes; writes the report JSON (and
PNG when matplotlib is there), and the resident memory of the policy before and after (its parameters and
buffers with the quantized layers deployed: packed codes only; on CUDA also torch.cuda.memory_allocated).

`--save DIR` writes the quantized, calibrated policy as a quantized checkpoint (docs/quantized-checkpoints.md);
`--ckpt DIR` of such a checkpoint loads it as saved and reports it (nothing is quantized or calibrated again).
(`--out` is the report folder, hence `--save` for the checkpoint.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize a pi0.5 policy under a preset and report the error",
                              description=__doc__)
    p.add_argument("--preset", default=None, help="A, B, precision, speed, fp (OPENPI_DUQUANT_* variables beat it)")
    p.add_argument("--ckpt", default=None,
                   help="pi0.5 checkpoint dir (default: the shipped reference policy, docs/reference.md)")
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece model (real checkpoints)")
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help="calibration observations: synthetic, libero:<suite> (real resets) or FILE.npz "
                        "(default: the checkpoint's calibration.npz when it has one, else synthetic)")
    p.add_argument("--out", default="duquant_report", help="folder for report.json / report.png")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write the quantized policy there (quantized checkpoint: docs/quantized-checkpoints.md)")
    p.add_argument("--no-rtn", action="store_true", help="skip the plain-RTN comparison (faster)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only; change nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from pytest_duquant.config import from_env, replace
    from pytest_duquant.quantize import enable_debug_logging, quantize_model

    config = from_env(os.environ, preset=args.preset)
    enable_debug_logging() if config.debug else None
    print(f"duquant: {config.describe()}")
    from pytest_duquant.libero.policy import CKPT_CALIBRATION
    from pytest_duquant.policies.pi05.errors import CheckpointError
    from pytest_duquant.policies.reference import reference_checkpoint
    from pytest_duquant.policies.session import SessionPolicyError, policy_factory

    try:
        ckpt = Path(args.ckpt) if args.ckpt else reference_checkpoint()
        make = policy_factory(ckpt, tokenizer=args.tokenizer)
        policy = make()
    except (CheckpointError, SessionPolicyError, FileNotFoundError) as exc:
        print(f"duquant: {exc}", file=sys.stderr)
        return 2
    if args.calib is None:
        args.calib = str(ckpt / CKPT_CALIBRATION) if (ckpt / CKPT_CALIBRATION).is_file() else "synthetic"
    source = args.ckpt or f"the shipped reference policy (trained on LIBERO demonstrations) at {ckpt}"
    print(f"policy: {source}; fingerprint {make.fingerprint}")
    if getattr(make, "quantized_manifest", None) is not None:
        return _report_quantized(policy, make.quantized_manifest, args)
    if args.dry_run or config.dryrun or not config.enabled:
        report = quantize_model(policy.model, replace(config, dryrun=True) if config.enabled else config)
        print(report.table())
        print(report.summary())
        return 0

    from pytest_duquant.libero.calibration import CalibrationSourceError, calibration_observations
    from pytest_duquant.metrics.probe import PolicyProbe

    try:
        calib = calibration_observations(args.calib)
    except CalibrationSourceError as exc:
        print(f"duquant: {exc}", file=sys.stderr)
        return 2
    print(f"calibration: {args.calib} ({config.calib_steps} policy calls, every denoising step observed)")
    probe = PolicyProbe(policy, fingerprint=make.fingerprint, calib_obs=calib)
    try:
        metrics = probe.measure(config, rtn=not args.no_rtn)
    finally:
        probe.close()
    print(format_metrics(metrics))
    try:
        resident = _resident(make, config, calib, ckpt, args)
    except CheckpointError as exc:
        print(f"duquant: {exc}", file=sys.stderr)
        return 2
    print(resident["line"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**metrics.to_dict(), "resident": resident["data"]}, indent=2) + "\n")
    written = [out / "report.json"]
    png = _maybe_plot(metrics, out)
    if png:
        written.append(png)
    if args.save:
        written.append(Path(args.save))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _resident(make, config, calib, ckpt: Path, args) -> dict:
    """Resident bytes of a fresh FP policy, then of it quantized + calibrated and deployed (packed codes only);
    with --save that policy is written as a quantized checkpoint."""
    from pytest_duquant.deploy import cuda_allocated, deploy_model, resident_bytes
    from pytest_duquant.policies.pi05.quantized_checkpoint import save_quantized
    from pytest_duquant.policies.session import policy_module, quantize_and_calibrate

    alloc0 = cuda_allocated()
    policy = make()
    model = policy_module(policy)
    before = resident_bytes(model)
    alloc_fp = cuda_allocated()
    policy, _report = quantize_and_calibrate(policy, config, calib)
    quantized = resident_bytes(model)
    deploy_model(model)
    after = resident_bytes(model)
    alloc_q = cuda_allocated()
    line = (f"resident (parameters + buffers): FP {before.total / 2**20:.2f} MiB -> quantized, deployed "
            f"{after.total / 2**20:.2f} MiB ({after.total / before.total:.2f}x; the undeployed quantized layers "
            f"held {quantized.total / 2**20:.2f} MiB)\n  deployed: {after}")
    if alloc_fp is not None:
        line += (f"\n  torch.cuda.memory_allocated: FP policy {(alloc_fp - alloc0) / 2**20:.1f} MiB, quantized "
                 f"{(alloc_q - alloc0) / 2**20:.1f} MiB")
    if args.save:
        save_quantized(policy, args.save, config=config, fp_ckpt=ckpt, fp_fingerprint=make.fingerprint,
                       calibration=str(args.calib))
        line += f"\nquantized checkpoint: {args.save} (load it with --ckpt {args.save})"
    data = {"before": before.to_dict(), "quantized_undeployed": quantized.to_dict(), "after": after.to_dict(),
            "cuda_allocated_fp": None if alloc_fp is None else alloc_fp - alloc0,
            "cuda_allocated_quantized": None if alloc_q is None else alloc_q - alloc0}
    return {"line": line, "data": data}


def _report_quantized(policy, manifest: dict, args) -> int:
    """--ckpt of a quantized checkpoint: what it holds (nothing is quantized or calibrated again)."""
    from pytest_duquant.deploy import resident_bytes
    from pytest_duquant.policies.session import policy_module

    if args.save:
        print(f"duquant: --ckpt {args.ckpt} is already a quantized checkpoint; --save needs the FP checkpoint",
              file=sys.stderr)
        return 2
    held = resident_bytes(policy_module(policy))
    print(f"quantized checkpoint: preset {manifest['preset']}, {len(manifest['layers'])} quantized layers, "
          f"from FP checkpoint {manifest['fp_fingerprint']} ({manifest.get('fp_checkpoint', '?')}); "
          f"format version {manifest['format_version']}")
    print(f"resident (parameters + buffers): {held}")
    print("loaded as saved: no quantization, no calibration (the action error needs the FP checkpoint: "
          "run duquant quantize --ckpt FP)")
    return 0


def format_metrics(metrics) -> str:
    w = max([len(la.name) for la in metrics.layers] + [5])
    rows = [f"{'layer':<{w}} {'shape':>11} {'bits':>4} {'SQNR dB':>8} {'RTN dB':>7} {'gain':>6}"]
    for la in metrics.layers:
        rtn = "-" if la.rtn_sqnr_db is None else f"{la.rtn_sqnr_db:7.2f}"
        gain = "-" if la.gain_db is None else f"{la.gain_db:+6.2f}"
        shape = f"{la.shape[0]:>5}x{la.shape[1]:<5}"
        rows.append(f"{la.name:<{w}} {shape} W{la.wbits:<3} {la.sqnr_db:8.2f} {rtn:>7} {gain:>6}")
    out = metrics.output
    rows.append("")
    rows.append(f"layers: {len(metrics.layers)}; mean SQNR {metrics.mean_sqnr_db:.2f} dB"
                + ("" if metrics.mean_rtn_sqnr_db is None else f" (plain RTN {metrics.mean_rtn_sqnr_db:.2f} dB)"))
    rows.append(f"action error vs FP: rel L2 {out.rel_l2:.4f}, max abs {out.max_abs:.4f}"
                + ("" if metrics.output_rtn is None else f" (plain RTN rel L2 {metrics.output_rtn.rel_l2:.4f})"))
    if out.per_step_rel_l2:
        rows.append("  per denoising step rel L2: " + " ".join(f"{v:.3f}" for v in out.per_step_rel_l2))
    ratio = metrics.bytes_before / metrics.bytes_after if metrics.bytes_after else float("nan")
    rows.append(f"quantized weights: {metrics.bytes_before / 2**20:.2f} MiB -> {metrics.bytes_after / 2**20:.2f} MiB "
                f"({ratio:.2f}x, packed int codes + scales + transforms)")
    return "\n".join(rows)


def _maybe_plot(metrics, out: Path):
    try:
        from pytest_duquant.reporting import model as model_report
    except ImportError:
        return None
    plot = getattr(model_report, "plot_model_report", None)
    if plot is None:
        return None
    png = out / "report.png"
    try:
        plot([metrics], png)
    except ImportError as exc:  # matplotlib is in the `test` extra, not the core install
        print(f"duquant: no PNG ({exc}); pip install matplotlib for the figure", file=sys.stderr)
        return None
    return png
