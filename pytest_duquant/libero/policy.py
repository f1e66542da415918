"""What the harness needs from a policy, and two policies that need no model.

Any object with ``infer_batch(observations, noise_seeds) -> np.ndarray[N, horizon, 7]`` works
(``pytest_duquant.policies.pi05.Pi05Policy`` does). ``observations`` are dicts with the keys of
openpi's LIBERO example (:mod:`pytest_duquant.libero.protocol`); ``noise_seeds[i]`` seeds the
flow-matching noise of observation i. ``horizon`` must be at least the protocol's replan steps (5).
Optional attributes read by the harness: ``fingerprint`` (checkpoint fingerprint) and ``preset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from pytest_duquant.libero.protocol import ACTION_DIM


@runtime_checkable
class Policy(Protocol):
    def infer_batch(self, observations: Sequence[dict], noise_seeds: Sequence[int]) -> np.ndarray: ...


class ConstantPolicy:
    """Returns the same action for every step (default: hold still, gripper open). No model."""

    fingerprint = "constant-policy"
    preset = "none"

    def __init__(self, action: Sequence[float] = (0, 0, 0, 0, 0, 0, -1), horizon: int = 10):
        self.action = np.asarray(action, dtype=np.float64)
        if self.action.shape != (ACTION_DIM,):
            raise ValueError(f"action={list(action)}: must have {ACTION_DIM} numbers")
        self.horizon = int(horizon)
        self.calls = 0
        self.batch_sizes: list[int] = []

    def infer_batch(self, observations, noise_seeds):
        if len(observations) != len(noise_seeds):
            raise ValueError(f"{len(observations)} observations but {len(noise_seeds)} noise seeds")
        self.calls += 1
        self.batch_sizes.append(len(observations))
        return np.broadcast_to(self.action, (len(observations), self.horizon, ACTION_DIM)).copy()


class SeededRandomPolicy:
    """Small random actions drawn from each query's noise seed: a stand-in that shows pairing.

    The same (observation order aside) noise seed gives the same chunk, whatever the batch.
    """

    fingerprint = "seeded-random-policy"
    preset = "none"

    def __init__(self, scale: float = 0.3, horizon: int = 10):
        self.scale = float(scale)
        self.horizon = int(horizon)

    def infer_batch(self, observations, noise_seeds):
        out = np.empty((len(observations), self.horizon, ACTION_DIM))
        for i, s in enumerate(noise_seeds):
            out[i] = np.random.default_rng(int(s)).uniform(
                -self.scale, self.scale, (self.horizon, ACTION_DIM)
            )
        out[..., -1] = np.sign(out[..., -1]) + (out[..., -1] == 0)
        return out


CKPT_CALIBRATION = "calibration.npz"  # calibration observations a checkpoint may ship (libero/calibration.py)


class PolicyUnavailableError(RuntimeError):
    """The pi0.5 policy cannot be loaded (module missing, bad checkpoint)."""


def serving_options(serve: dict | str | None, device: str, fast: bool = True) -> dict:
    """``serve`` as Pi05Policy.serve_fast's keyword options: a dict as given, or a name of ``SERVING``.
    ValueError (a one-line message) for an unknown name, a compiled serving off CUDA, or any serving option
    with the exact path."""
    if serve is None:
        return {}
    label = (f"serving with {', '.join(k for k, v in serve.items() if v) or 'no options'}"
             if isinstance(serve, dict) else f"--serve {serve!r}")
    if isinstance(serve, dict):
        options = dict(serve)
    else:
        from pytest_duquant.policies.pi05.policy import SERVING

        if serve not in SERVING:
            raise ValueError(f"{label}: unknown; allowed: {', '.join(SERVING)}")
        options = dict(SERVING[serve])
    if options and not fast:
        raise ValueError(f"{label} serves the fast path; --exact-path serves openpi's exact one: "
                         "choose one")
    if options.get("compile_step") and not str(device).startswith("cuda"):
        raise ValueError(f"{label} compiles for a CUDA GPU; this policy runs on {device!r} "
                         "(serve 'graphed', which is eager there)")
    return options


def pi05_policy_factory(
    ckpt, config=None, *, tokenizer=None, backend: str = "builtin", device: str | None = None,
    calibration: str | None = None, fast: bool = True, serve: dict | str | None = None,
):
    """A zero-argument factory: the pi0.5 policy of ``ckpt``, quantized and calibrated under ``config``.

    ``fast`` (default): once quantized and calibrated (on openpi's exact path, as the goldens were), the
    policy serves its fast path, CUDA-graphed on a GPU, batches padded to a few sizes so that one graph per
    size serves every batch the workers send (``Pi05Policy.serve_fast``, docs/speed.md); FP and quantized
    alike. ``fast=False`` serves openpi's exact path. ``serve``: keyword options of
    ``Pi05Policy.serve_fast`` (``compile_step``, ``compile_prefix``, ``batch_sizes``, ``short_query``, ``fuse``;
    docs/speed.md), or their name in ``SERVING`` ("graphed", "compiled": the latter needs CUDA).

    ``config`` None or disabled (preset ``fp``) gives the FP policy. ``calibration``: the calibration
    source (``synthetic``, ``libero:<suite>``, or an .npz path; see libero/calibration.py). Default: the
    checkpoint's own ``calibration.npz`` when it ships one (the reference policy does), else synthetic.
    Nothing is loaded until the factory is called, so a run with nothing left to do (resume) never
    loads the model. The factory carries
    ``fingerprint`` (the checkpoint's) and ``preset`` so results can be labelled before loading.
    """
    try:
        from pytest_duquant.policies import session
    except ImportError as exc:  # the pi0.5 room is someone else's; say what is missing
        raise PolicyUnavailableError(
            f"pytest_duquant.policies (pi0.5) is not available ({type(exc).__name__}: {exc}); "
            "rollouts with a checkpoint need it"
        ) from None
    if device is None:
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    serve = serving_options(serve, device, fast)  # the cheap checks before the checkpoint's
    try:
        base = session.policy_factory(ckpt, tokenizer=tokenizer, backend=backend, device=device)
    except Exception as exc:  # noqa: BLE001 - a clear message naming the checkpoint
        raise PolicyUnavailableError(f"--ckpt {ckpt}: cannot load the pi0.5 policy: {exc}") from exc
    enabled = config is not None and config.enabled
    preset = config.preset if enabled else "fp"
    manifest = getattr(base, "quantized_manifest", None)
    if manifest is not None:  # a quantized checkpoint: its own preset; other settings are refused here
        if enabled:
            try:
                from pytest_duquant.policies.pi05.quantized_checkpoint import check_config

                check_config(manifest, config, where=f"--ckpt {ckpt}")
            except Exception as exc:  # noqa: BLE001 - one line naming the checkpoint
                raise PolicyUnavailableError(str(exc)) from None
        preset = manifest["preset"]
    if calibration is None and (Path(ckpt) / CKPT_CALIBRATION).is_file():
        calibration = str(Path(ckpt) / CKPT_CALIBRATION)

    def make():
        policy = base()
        if enabled:
            from pytest_duquant.libero.calibration import calibration_observations

            calib = calibration_observations(calibration)
            policy, _report = session.quantize_and_calibrate(policy, config, calib)
        if fast and hasattr(policy, "serve_fast"):
            policy.serve_fast(**serve)
        policy.preset = preset
        return policy

    make.fingerprint = base.fingerprint
    make.preset = preset
    return make
