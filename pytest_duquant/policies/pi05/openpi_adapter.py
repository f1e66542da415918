"""openpi backend (`--policy-backend=openpi`): load a checkpoint through openpi's own loader.

Used when `openpi` is importable (a user inside an openpi checkout with its transformers_replace patch).
The adapter exposes the same `infer(observation, noise_seed)` / `infer_batch(...)` as Pi05Policy and feeds
openpi the identical noise (`noise_for_seed`), so both backends can be compared call by call.
openpi can only build the full-size model (its PaliGemma wrapper hard-codes So400m and a 2048-wide
projector), so the `dummy` variant is not loadable through it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from pytest_duquant.policies.pi05.policy import noise_for_seed


def unavailable_reason() -> str | None:
    """None when openpi's PyTorch policy stack imports, else why not."""
    try:
        import openpi.models_pytorch.pi0_pytorch  # noqa: F401
        import openpi.policies.policy_config  # noqa: F401
        import openpi.training.config  # noqa: F401
    except Exception as exc:  # ImportError, or openpi's own checks (transformers_replace not installed)
        return f"{type(exc).__name__}: {exc}"
    return None


class OpenpiPolicy:
    def __init__(self, policy, action_horizon: int, action_dim: int, output_action_dim: int = 7):
        self.policy = policy
        self.action_horizon, self.action_dim, self.output_action_dim = (
            action_horizon,
            action_dim,
            output_action_dim,
        )

    def infer(self, observation: dict, noise_seed: int = 0) -> np.ndarray:
        noise = noise_for_seed(noise_seed, self.action_horizon, self.action_dim).numpy()
        out = self.policy.infer(dict(observation), noise=noise)
        return np.asarray(out["actions"], dtype=np.float32)[:, : self.output_action_dim]

    def infer_batch(self, observations: Sequence[dict], noise_seeds: Sequence[int]) -> np.ndarray:
        return np.stack([self.infer(o, s) for o, s in zip(observations, noise_seeds, strict=True)])


def load_openpi_policy(
    ckpt_dir: str | os.PathLike, config_name: str = "pi05_libero", device: str | None = None
):
    """openpi `create_trained_policy(get_config(config_name), ckpt_dir)` wrapped as an OpenpiPolicy."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"the openpi backend needs an importable openpi ({reason})")
    from openpi.policies import policy_config
    from openpi.training import config as _config

    train_config = _config.get_config(config_name)
    policy = policy_config.create_trained_policy(train_config, str(ckpt_dir), pytorch_device=device)
    model_cfg = train_config.model
    return OpenpiPolicy(policy, model_cfg.action_horizon, model_cfg.action_dim)
