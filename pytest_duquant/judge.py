"""The judge: a run's records against the LIBERO goldens -> a Judgement. ``duquant gate`` and the
``pytest -m libero`` suite both call :func:`judge`; they only parse options and print.

Per suite present in the records the outcome is one of

- ``pass``: the drop is shown below the allowed drop (upper confidence bound < delta);
- ``regression``: the drop is shown above it (lower confidence bound > delta);
- ``inconclusive`` (or ``continue`` in sequential mode): neither yet; it says how many more paired
  episodes would likely decide;
- ``unusable``: the suite cannot be judged, and the reason names what is missing: no golden, another
  fingerprint/protocol/seed, episodes of the declared plan missing from the run (an incomplete run is
  never a verdict), too few episodes, no allowed drop for the preset.

The overall outcome is the worst (regression > unusable > inconclusive/continue > pass), and
:attr:`Judgement.exit_code` is the CLI's: 0 pass, 1 regression, 2 unusable input, 3 inconclusive / keep
running (4, an internal error, is the CLI's own). docs/gate.md has the statistics and what a verdict
certifies.

The declared plan: ``tasks`` x ``trials`` (default: every episode of the golden) of the golden's seed.
A CI smoke run of 20 episodes (tasks 0-9 x trials 0-1) is judged on exactly those 20 golden episodes.

Drift: the golden records the stack and device of its FP run; the judge compares them with the run's
(the records' ``env`` field) and says so. Same-machine mode (``reference=`` the FP arm rolled out in the
same job on the same episodes): the candidate is paired with that FP arm, and the golden only checks the
FP arm for drift.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_duquant.gate import (
    CONTINUE,
    INCONCLUSIVE,
    PASS,
    REGRESSION,
    GateDecision,
    GateInputError,
    SequentialDesign,
    design_sequential,
    gate,
    sequential_monitor,
)
from pytest_duquant.golden.common import GoldenError, drift
from pytest_duquant.golden.episodes import LiberoGolden, check_compatible, find_golden, read_golden
from pytest_duquant.results import EpisodeKey, EpisodeResult, ResultsError, outcomes

__all__ = [
    "EXIT_CODES",
    "UNUSABLE",
    "Judgement",
    "SuiteJudgement",
    "judge",
    "sequential_design",
]

UNUSABLE = "unusable"
EXIT_CODES = {PASS: 0, REGRESSION: 1, UNUSABLE: 2, INCONCLUSIVE: 3, CONTINUE: 3}
_WORST = (REGRESSION, UNUSABLE, INCONCLUSIVE, CONTINUE, PASS)
MODES = ("paired", "unpaired", "sequential")


@dataclass
class SuiteJudgement:
    """One suite: its outcome, the statistics behind it, or why it could not be judged."""

    suite: str
    outcome: str
    reason: str = ""
    decision: GateDecision | None = None
    golden: str | None = None
    plan: str = ""
    notes: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    fp_arm: GateDecision | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def text(self) -> str:
        head = self.decision.explanation if self.decision is not None else f"UNUSABLE: {self.reason}"
        lines = [f"{self.suite}: {head}"]
        if self.decision is not None and self.reason:
            lines.append(f"  {self.reason}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.drift:
            lines.append(
                "  drift: the golden's FP run used another stack/device (" + "; ".join(self.drift) + "); an FP "
                "shift of a few points between machines moves every verdict: prefer the same-machine mode"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "verdict": self.outcome,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "golden": self.golden,
            "plan": self.plan,
            "notes": list(self.notes),
            "drift": list(self.drift),
            "decision": None if self.decision is None else self.decision.to_dict(),
            "fp_arm_vs_golden": None if self.fp_arm is None else self.fp_arm.to_dict(),
        }


@dataclass
class Judgement:
    """The judge's answer for a whole run: one SuiteJudgement per suite, or run-level problems."""

    suites: list[SuiteJudgement]
    fingerprint: str | None = None
    protocol: str | None = None
    preset: str | None = None
    mode: str = "paired"
    multiplicity: str = "bonferroni"
    problems: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        outcomes_ = [s.outcome for s in self.suites] + [UNUSABLE] * bool(self.problems)
        return next((w for w in _WORST if w in outcomes_), UNUSABLE)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def header(self) -> str:
        m = len([s for s in self.suites if s.decision is not None])
        multi = f", {m} suites (regression side at alpha/{m}, {self.multiplicity})" if m > 1 else ""
        return (
            f"duquant gate: checkpoint {self.fingerprint}, protocol {self.protocol}, preset {self.preset}, "
            f"mode {self.mode}{multi}"
        )

    def text(self) -> str:
        lines = [self.header()]
        lines += [f"UNUSABLE: {p}" for p in self.problems]
        lines += [s.text() for s in self.suites]
        lines.append(f"VERDICT: {self.verdict.upper()} (exit {self.exit_code})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "fingerprint": self.fingerprint,
            "protocol": self.protocol,
            "preset": self.preset,
            "mode": self.mode,
            "multiplicity": self.multiplicity,
            "problems": list(self.problems),
            "suites": [s.to_dict() for s in self.suites],
        }


class _Unusable(Exception):
    """A suite (or the run) cannot be judged; the message says why."""


def _one(values: set, what: str) -> Any:
    if None in values:
        raise _Unusable(f"some results do not name their {what}: cannot check them against the golden")
    if len(values) != 1:
        raise _Unusable(f"results mix several {what}s: {sorted(map(str, values))}; judge one run at a time")
    return next(iter(values))


def _load_goldens(source: str | os.PathLike | Mapping[str, LiberoGolden], suites: list[str], fingerprint: str):
    """suite -> LiberoGolden or the reason there is none (str), and suite -> path."""
    if isinstance(source, Mapping):
        return {s: source.get(s, f"no golden given for suite {s!r}") for s in suites}, {}
    src = Path(source)
    if src.is_file():
        try:
            g = read_golden(src)
        except GoldenError as e:
            return {s: str(e) for s in suites}, {}
        return (
            {s: g if s == g.suite else f"the golden given ({src}) is for suite {g.suite!r}, not {s!r}" for s in suites},
            {g.suite: str(src)},
        )
    if not src.exists():
        return {s: f"{src}: golden file or directory not found" for s in suites}, {}
    out, paths = {}, {}
    for s in suites:
        try:
            path = find_golden(src, fingerprint, s)
            out[s], paths[s] = read_golden(path), str(path)
        except GoldenError as e:
            out[s] = str(e)
    return out, paths


def _plan(golden: LiberoGolden, tasks, trials) -> tuple[list[EpisodeKey], str]:
    """The golden's episodes of the declared tasks x trials; declared episodes the golden lacks are unusable."""
    keys = list(golden.outcomes())
    if tasks is None and trials is None:
        return keys, f"all {len(keys)} episodes of the golden"
    t_set = None if tasks is None else {int(t) for t in tasks}
    k_set = None if trials is None else {int(t) for t in trials}
    chosen = [k for k in keys if (t_set is None or k.task_id in t_set) and (k_set is None or k.trial in k_set)]
    have = {(k.task_id, k.trial) for k in keys}
    want_tasks = t_set if t_set is not None else {k.task_id for k in keys}
    want_trials = k_set if k_set is not None else {k.trial for k in keys}
    lacking = sorted((t, r) for t in want_tasks for r in want_trials if (t, r) not in have)
    if lacking:
        raise _Unusable(
            f"the declared plan asks for {len(lacking)} episode(s) the golden does not hold (e.g. task "
            f"{lacking[0][0]} trial {lacking[0][1]}); the golden has {len(keys)} episodes"
        )
    return chosen, (
        f"{len(chosen)} declared episodes (tasks {_ids(want_tasks)} x trials {_ids(want_trials)}) of the "
        f"golden's {len(keys)}"
    )


def _ids(values) -> str:
    v = sorted(values)
    if v and v == list(range(v[0], v[-1] + 1)) and len(v) > 2:
        return f"{v[0]}-{v[-1]}"
    return ",".join(map(str, v))


def _env(records: Sequence[EpisodeResult]) -> dict | None:
    envs = [r.extra.get("env") for r in records if isinstance(r.extra.get("env"), dict)]
    return envs[0] if envs else None


def _missing_text(missing: list[EpisodeKey], plan_size: int, who: str) -> str:
    shown = ", ".join(str(k) for k in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return (
        f"incomplete run: {len(missing)} of the {plan_size} planned episodes are missing from the {who} ({shown}); "
        "a run that stopped early is never judged: resume it (the results file resumes)"
    )


def _judge_suite(
    suite: str,
    cand_records: list[EpisodeResult],
    golden: LiberoGolden,
    *,
    preset: str,
    allowed_drop: float | None,
    alpha: float | None,
    mode: str,
    tasks,
    trials,
    reference: list[EpisodeResult] | None,
    m: int,
    min_episodes: int,
    max_mdd: float | None,
    looks: int,
    in_flight: int,
    design_cache,
    fingerprint: str,
    protocol: str,
) -> SuiteJudgement:
    try:
        check_compatible(golden, fingerprint=fingerprint, protocol=protocol, suite=suite)
    except GoldenError as e:
        raise _Unusable(str(e)) from None
    delta = allowed_drop if allowed_drop is not None else _allowed(golden, preset)
    a = golden.alpha if alpha is None else float(alpha)
    a_reg = a / m
    notes: list[str] = []
    cand = outcomes(cand_records)
    plan, plan_text = _plan(golden, tasks, trials)
    gold = golden.outcomes()
    if mode != "unpaired":
        other = sorted({k.seed for k in cand} - golden.seeds)
        if other:
            raise _Unusable(
                f"the run used seed(s) {other}, the golden seed(s) {sorted(golden.seeds)}: episodes of another seed "
                "do not pair with the golden (rerun with the golden's seed, or --mode unpaired)"
            )
    plan_set = set(plan)
    ignored = [k for k in cand if k not in plan_set]
    if ignored:
        notes.append(f"{len(ignored)} episode(s) of the run outside the declared plan are not judged")
    if len(plan) < min_episodes:
        raise _Unusable(
            f"only {len(plan)} episodes are planned, fewer than --min-episodes {min_episodes}: too few to judge"
        )
    fp_arm = None
    if reference is not None:
        arm = [r for r in reference if r.suite == suite]
        other = {(r.fingerprint, r.protocol) for r in arm} - {(fingerprint, protocol)}
        if other:
            raise _Unusable(
                f"the same-machine FP arm is of another checkpoint/protocol {sorted(map(str, other))}, the run "
                f"is ({fingerprint}, {protocol})"
            )
        ref_out = outcomes(arm)
        lacking = [k for k in plan if k not in ref_out]
        if lacking:
            raise _Unusable(_missing_text(lacking, len(plan), "same-machine FP arm"))
        ref = {k: ref_out[k] for k in plan}
        fp_arm = gate({k: gold[k] for k in plan}, ref, allowed_drop=0.0, alpha=a)
        notes.append(
            "same-machine mode: paired with the FP arm of this job; FP arm vs golden: "
            + {
                REGRESSION: f"the FP arm is shown WORSE than the golden (drop interval [{_pt(fp_arm.ci)}]): "
                "this machine/stack drifted",
                PASS: f"the FP arm is shown BETTER than the golden (interval [{_pt(fp_arm.ci)}]): drift",
                INCONCLUSIVE: f"no drift shown (drop interval [{_pt(fp_arm.ci)}])",
            }[fp_arm.verdict]
        )
        moved = drift(golden.env, _env(reference))
    else:
        ref = {k: gold[k] for k in plan}
        moved = drift(golden.env, _env(cand_records))
    if mode == "sequential":
        design = sequential_design(len(plan), looks=looks, alpha=a_reg, allowed_drop=delta,
                                   min_first=min_episodes, cache=design_cache)
        try:
            d = sequential_monitor(ref, {k: cand[k] for k in plan if k in cand}, design=design,
                                   in_flight=in_flight, max_mdd=max_mdd)
        except GateInputError as e:
            raise _Unusable(str(e)) from None
        return SuiteJudgement(suite, d.verdict, "", d, None, plan_text, notes, moved, fp_arm)
    if mode == "unpaired":
        c_out = {k: v for k, v in cand.items() if (tasks is None or k.task_id in tasks)
                 and (trials is None or k.trial in trials)}
        if len(c_out) < min_episodes:
            raise _Unusable(f"only {len(c_out)} candidate episodes, fewer than --min-episodes {min_episodes}")
        d = gate(ref, c_out, allowed_drop=delta, alpha=a_reg, pass_alpha=a, mode="unpaired", max_mdd=max_mdd)
        return SuiteJudgement(suite, d.verdict, "", d, None, plan_text, notes, moved, fp_arm)
    missing = [k for k in plan if k not in cand]
    if missing:
        raise _Unusable(_missing_text(missing, len(plan), "run"))
    d = gate(ref, {k: cand[k] for k in plan}, allowed_drop=delta, alpha=a_reg, pass_alpha=a, mode="paired",
             max_mdd=max_mdd)
    return SuiteJudgement(suite, d.verdict, "", d, None, plan_text, notes, moved, fp_arm)


def _pt(ci) -> str:
    return f"{100 * ci[0]:.1f}, {100 * ci[1]:.1f}"


def _allowed(golden: LiberoGolden, preset: str) -> float:
    try:
        return golden.allowed_drop_for(preset)
    except GoldenError as e:
        raise _Unusable(str(e)) from None


def judge(
    records: Sequence[EpisodeResult],
    goldens: str | os.PathLike | Mapping[str, LiberoGolden],
    *,
    preset: str | None = None,
    allowed_drop: float | None = None,
    alpha: float | None = None,
    mode: str = "paired",
    tasks: Sequence[int] | None = None,
    trials: Sequence[int] | None = None,
    reference: Sequence[EpisodeResult] | None = None,
    multiplicity: str = "bonferroni",
    min_episodes: int = 20,
    max_mdd: float | None = None,
    looks: int = 4,
    in_flight: int = 8,
    design_cache: str | os.PathLike | bool | None = None,
) -> Judgement:
    """Judge a run's records against the goldens (a golden file, a golden root, or suite -> LiberoGolden).

    preset: whose allowed drop applies (default: the records'); allowed_drop overrides the golden's table;
    alpha overrides the golden's. tasks/trials: the declared plan (default: all the golden's episodes).
    reference: the same-machine FP arm's records (the candidate is paired with it; the golden checks its
    drift). multiplicity: with several suites the regression side runs at alpha/m ("bonferroni") or alpha
    ("none"); a pass needs every suite's own pass (no correction needed). mode "sequential": looks over
    the plan (design cached in memory and, unless design_cache=False, on disk).
    """
    if mode not in MODES:
        raise GateInputError(f"mode={mode!r}: allowed are {', '.join(MODES)}")
    if multiplicity not in ("bonferroni", "none"):
        raise GateInputError(f"multiplicity={multiplicity!r}: allowed are bonferroni, none")
    records = list(records)
    j = Judgement([], mode=mode, multiplicity=multiplicity, preset=preset)
    try:
        if not records:
            raise _Unusable("no finished episodes in the results")
        j.fingerprint = _one({r.fingerprint for r in records}, "checkpoint fingerprint")
        j.protocol = _one({r.protocol for r in records}, "protocol")
        if preset is None:
            j.preset = _one({r.preset for r in records}, "preset")
    except (_Unusable, ResultsError) as e:
        j.problems.append(str(e))
        return j
    suites = sorted({r.suite for r in records})
    found, paths = _load_goldens(goldens, suites, j.fingerprint)
    m = sum(isinstance(g, LiberoGolden) for g in found.values()) if multiplicity == "bonferroni" else 1
    for s in suites:
        g = found[s]
        if not isinstance(g, LiberoGolden):
            j.suites.append(SuiteJudgement(s, UNUSABLE, f"not judgeable: {g}"))
            continue
        try:
            sj = _judge_suite(
                s, [r for r in records if r.suite == s], g, preset=j.preset, allowed_drop=allowed_drop, alpha=alpha,
                mode=mode, tasks=tasks, trials=trials, reference=None if reference is None else list(reference),
                m=max(m, 1), min_episodes=min_episodes, max_mdd=max_mdd, looks=looks, in_flight=in_flight,
                design_cache=design_cache, fingerprint=j.fingerprint, protocol=j.protocol,
            )
        except (_Unusable, GateInputError, ResultsError) as e:
            sj = SuiteJudgement(s, UNUSABLE, str(e))
        sj.golden = paths.get(s)
        j.suites.append(sj)
    return j


# ---- sequential designs, computed once --------------------------------------------------------------


def _cache_dir(cache) -> Path | None:
    if cache is False:
        return None
    if cache not in (None, True):
        return Path(cache)
    if os.environ.get("PYTEST_DUQUANT_CACHE"):
        return Path(os.environ["PYTEST_DUQUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pytest-duquant"


def sequential_design(
    n_max: int, *, looks: int, alpha: float, allowed_drop: float, min_first: int = 1, cache=None
) -> SequentialDesign:
    """design_sequential (memoized in the process), also kept on disk under the user cache dir
    (``$PYTEST_DUQUANT_CACHE``, else ``$XDG_CACHE_HOME/pytest-duquant``, else ``~/.cache/pytest-duquant``;
    ``cache=False``: memory only), so a design is computed once per (N, looks, alpha, delta)."""
    args = {"n_max": int(n_max), "looks": int(looks), "alpha": float(alpha), "allowed_drop": float(allowed_drop),
            "min_first": int(min_first), "v": 2}
    d = _cache_dir(cache)
    path = None
    if d is not None:
        digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:20]
        path = d / "sequential" / f"{digest}.json"
        try:
            data = json.loads(path.read_text())
            if data.get("args") == args:
                return SequentialDesign.from_dict(data["design"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    design = design_sequential(
        int(n_max), allowed_drop=allowed_drop, alpha=alpha, looks=int(looks), min_first=int(min_first)
    )
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"args": args, "design": design.to_dict()}))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs time
    return design
