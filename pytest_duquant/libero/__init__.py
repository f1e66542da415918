"""LIBERO rollouts under openpi's protocol: simulator setup, episodes, parallel harness, results JSONL.

Importing this package does not import LIBERO (the simulator is imported in the worker processes,
after :func:`pytest_duquant.libero.sim_setup.prepare`).

Public API::

    from pytest_duquant.libero import run_rollouts, Policy, ProtocolSettings, PROTOCOL
    summary = run_rollouts(policy, "libero_spatial", tasks=[0], trials=5, seed=7, workers=4,
                           results_path="out.jsonl", preset="B")
"""

from pytest_duquant.libero.policy import ConstantPolicy, Policy, SeededRandomPolicy
from pytest_duquant.libero.protocol import (
    MAX_STEPS,
    PROTOCOL,
    SUITE_TASKS,
    ProtocolSettings,
    make_observation,
    noise_seed,
    parse_ids,
)


def __getattr__(name):  # the harness pulls in multiprocessing machinery: load it on first use
    if name in ("run_rollouts", "RolloutSummary", "RolloutError", "plan_episodes"):
        from pytest_duquant.libero import harness

        return getattr(harness, name)
    raise AttributeError(name)


__all__ = [
    "PROTOCOL",
    "MAX_STEPS",
    "SUITE_TASKS",
    "ProtocolSettings",
    "make_observation",
    "noise_seed",
    "parse_ids",
    "Policy",
    "ConstantPolicy",
    "SeededRandomPolicy",
    "run_rollouts",
    "RolloutSummary",
    "RolloutError",
    "plan_episodes",
]
