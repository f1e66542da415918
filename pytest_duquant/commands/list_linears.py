"""`duquant list-linears CKPT [--scope S] [--preset P] [--json]`: every nn.Linear, shape, selected?, bits.

CKPT is a pi0.5 checkpoint directory (openpi or lerobot layout; only config.json and the safetensors header
are read, the model is built on the meta device) or a variant name (`pi05`, `dummy`) for the structure alone.
Exit status: 0 listed, 2 unusable input (bad checkpoint, bad config value).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "list-linears",
        help="list every nn.Linear of a pi0.5 checkpoint with shape, selection and bits",
        description=__doc__,
    )
    parser.add_argument("ckpt", help="checkpoint directory, or a variant name: pi05 | dummy")
    parser.add_argument(
        "--scope",
        default=None,
        help="qualified-name prefix (default: OPENPI_DUQUANT_SCOPE or "
        "paligemma_with_expert.gemma_expert.model.)",
    )
    parser.add_argument("--preset", default=None, help="DuQuant preset (A, B, precision, speed, fp)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def collect(ckpt: str, scope: str | None = None, preset: str | None = None) -> dict:
    """The listing as a dict (also the --json output)."""
    from pytest_duquant.config import from_env
    from pytest_duquant.policies.pi05.checkpoint import (
        WEIGHTS_NAME,
        _strip_prefix,
        check_keys,
        detect_layout,
        read_config,
        weight_shapes,
    )
    from pytest_duquant.policies.pi05.configuration import VARIANTS, variant_config
    from pytest_duquant.policies.pi05.modeling import build_model
    from pytest_duquant.selection import linear_choices

    path = Path(ckpt)
    if path.is_dir():
        layout = detect_layout(path)
        config = read_config(path, layout)
        model = build_model(config, device="meta")
        check_keys(model, _strip_prefix(weight_shapes(path / WEIGHTS_NAME), layout), path / WEIGHTS_NAME)
        source = {"checkpoint": str(path), "layout": layout}
    elif ckpt in VARIANTS:
        config = variant_config(ckpt)
        model = build_model(config, device="meta")
        source = {"checkpoint": None, "layout": None}
    else:
        from pytest_duquant.policies.pi05.errors import CheckpointError

        raise CheckpointError(
            f"{ckpt}: neither a checkpoint directory nor a variant name ({', '.join(VARIANTS)})"
        )
    overrides = {"scope": scope} if scope is not None else None
    dq = from_env(preset=preset, overrides=overrides)
    choices = linear_choices(model, dq)
    return {
        **source,
        "variant": config.variant,
        "scope": dq.scope,
        "preset": dq.preset,
        "total": len(choices),
        "selected": sum(c.selected for c in choices),
        "linears": [c.to_dict() for c in choices],
    }


def run(args) -> int:
    from pytest_duquant.config import DuQuantConfigError
    from pytest_duquant.policies.pi05.errors import CheckpointError

    try:
        listing = collect(args.ckpt, args.scope, args.preset)
    except (CheckpointError, DuQuantConfigError) as exc:
        print(f"duquant list-linears: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(listing, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    rows = listing["linears"]
    width = max((len(r["name"]) for r in rows), default=4)
    print(
        f"# {listing['checkpoint'] or 'variant ' + listing['variant']}  scope={listing['scope']!r}  "
        f"preset={listing['preset']}"
    )
    print(f"{'name':<{width}}  {'shape [out, in]':<16}  sel  bits  reason")
    for r in rows:
        shape = f"[{r['shape'][0]}, {r['shape'][1]}]"
        bits = "-" if r["wbits"] is None else str(r["wbits"])
        print(
            f"{r['name']:<{width}}  {shape:<16}  {'yes' if r['selected'] else 'no ':<3}  "
            f"{bits:>4}  {r['reason']}"
        )
    print(f"# {listing['selected']} of {listing['total']} linears selected")
    return 0
