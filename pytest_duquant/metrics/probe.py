"""Measuring quantized variants of one FP model against it (`Probe.measure` -> ModelMetrics).

For one FP model and one config: the output error of the quantized model vs the FP model on fixed
evaluation inputs (pi0.5: the action chunk after every denoising step, same noise seeds; MiniLM: the
sentence embeddings); per-layer SQNR of every quantized linear on its real calibration inputs (the FP
model's inputs to that layer, fed to the quantized layer and to the FP linear in float64); the same for
plain RTN (`quantize_model(model, RTNConfig(config))`); weight bytes before/after and peak memory.

Each variant swaps the selected linears of the one FP model in place and restores them afterwards, so the
FP model, its reference outputs and its layers' inputs are computed once. `Measurements` caches measured
variants by their numeric settings for a test session.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pytest_duquant import progress
from pytest_duquant.baselines.rtn import RTNConfig
from pytest_duquant.config import DuQuantConfig, from_env, replace
from pytest_duquant.metrics.capture import InputCapture, PeakMemory, module_bytes, record_denoising
from pytest_duquant.metrics.records import (
    SQNR_CAP_DB,
    LayerError,
    ModelMetrics,
    OutputError,
    golden_name,
    layer_position,
    numeric_settings,
)
from pytest_duquant.quantize import calibration, quantize_model, set_submodule
from pytest_duquant.selection import linear_choices


class Probe:
    """Measures quantized variants of one FP model against it. Subclasses say how to run the model."""

    model_name = "model"

    def __init__(
        self,
        model: nn.Module,
        *,
        fingerprint: str,
        max_rows: int = 4096,
        sqnr_calls: int = 16,
        device: str | torch.device = "cpu",
        threads: int | None = 1,
    ):
        self.model = model
        self.threads = threads
        self._depth = 0
        self.fingerprint = fingerprint
        self.max_rows = max_rows
        self.sqnr_calls = sqnr_calls
        self.device = torch.device(device)
        self._fp_modules: dict[str, nn.Module] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._fp_states: list[torch.Tensor] | None = None
        self._packdir = tempfile.TemporaryDirectory(prefix="duquant-probe-packs-")

    # -- to implement --
    def calibration_calls(self, calls: int) -> None:
        raise NotImplementedError

    def evaluate(self) -> list[torch.Tensor]:
        """Outputs on the evaluation inputs, one tensor per step (last = final)."""
        raise NotImplementedError

    def protocol(self, config: DuQuantConfig) -> dict:
        return {}

    def scoped(self, config: DuQuantConfig) -> DuQuantConfig:
        return config

    @contextlib.contextmanager
    def extra_context(self) -> Iterator[None]:
        yield

    # -- common --
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Fixed torch thread count (the reduction order, hence the numbers, may depend on it)."""
        if self._depth:
            yield
            return
        self._depth += 1
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with self.extra_context():
                yield
        finally:
            torch.set_num_threads(before)
            self._depth -= 1

    def close(self) -> None:
        self.restore()
        self._packdir.cleanup()

    def restore(self) -> None:
        """Put the FP linears back."""
        for name, module in self._fp_modules.items():
            set_submodule(self.model, name, module)

    def fp_states(self) -> list[torch.Tensor]:
        if self._fp_states is None:
            self.restore()
            with self.running():
                self._fp_states = self.evaluate()
        return self._fp_states

    def selected(self, config: DuQuantConfig) -> list[str]:
        self.restore()
        return [c.name for c in linear_choices(self.model, config) if c.selected]

    def _ensure_inputs(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self._inputs]
        if not missing:
            return
        self.restore()
        for n in missing:
            self._fp_modules.setdefault(n, self.model.get_submodule(n))
        with self.running(), InputCapture(self.model, missing, self.max_rows) as cap, torch.no_grad():
            self.calibration_calls(self.sqnr_calls)
        self._inputs.update(cap.inputs())

    def _layer_sqnr(self, name: str, module: nn.Module, chunk: int = 2048) -> tuple[float, int]:
        fp = self._fp_modules[name]
        x = self._inputs[name]
        w64 = fp.weight.detach().to(torch.float64)
        b64 = None if fp.bias is None else fp.bias.detach().to(torch.float64)
        num = den = 0.0
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                xs = x[i : i + chunk]
                ref = F.linear(xs.to(torch.float64), w64, b64)
                out = module(xs.to(fp.weight.dtype)).to(torch.float64)
                num += ref.pow(2).sum().item()
                den += (ref - out).pow(2).sum().item()
        if den <= 0:
            return SQNR_CAP_DB, int(x.shape[0])
        return float(min(SQNR_CAP_DB, 10 * math.log10(max(num, 1e-300) / den))), int(x.shape[0])

    def measure(self, config: DuQuantConfig, *, rtn: bool = True, label: str | None = None) -> ModelMetrics:
        """Quantize (DuQuant, then plain RTN when `rtn`), calibrate, evaluate, restore the FP model."""
        with self.running():
            return self._measure(config, rtn=rtn, label=label)

    def _measure(self, config: DuQuantConfig, *, rtn: bool, label: str | None) -> ModelMetrics:
        t0 = time.perf_counter()
        config = self.scoped(config)
        if config.source_of("packdir") in ("default",) or config.packdir == "./duquant_packed":
            config = replace(config, packdir=self._packdir.name)
        names = self.selected(config)
        if not names:
            raise ValueError(f"config {config.describe()}: selects no linear of {self.model_name}")
        for n in names:
            self._fp_modules.setdefault(n, self.model.get_submodule(n))
        what = f"{self.model_name} {label or config.preset}"
        with progress.phase(f"{what}: FP layer inputs and reference outputs"):
            self._ensure_inputs(names)
            fp_states = self.fp_states()
        # DuQuant
        report = quantize_model(self.model, config)
        try:
            with self.running():
                with calibration(self.model):
                    self.calibration_calls(config.calib_steps)
                with PeakMemory(self.device) as mem, progress.phase(f"{what}: evaluation"):
                    q_states = self.evaluate()
            quant_bytes = module_bytes(self.model)
            with progress.phase(f"{what}: per-layer SQNR"):
                dq = {n: self._layer_sqnr(n, self.model.get_submodule(n)) for n in names}
        finally:
            self.restore()
        # plain RTN
        rtn_sqnr: dict[str, float] = {}
        output_rtn = None
        if rtn:
            with progress.phase(f"{what}: plain RTN baseline (quantize, calibrate, evaluate)"):
                try:
                    quantize_model(self.model, RTNConfig(config))
                    with self.running():
                        with calibration(self.model):
                            self.calibration_calls(config.calib_steps)
                        r_states = self.evaluate()
                    output_rtn = OutputError.between(fp_states, r_states)
                    rtn_sqnr = {n: self._layer_sqnr(n, self.model.get_submodule(n))[0] for n in names}
                finally:
                    self.restore()
        records = {r.name: r for r in report.layers}
        layers = []
        for n in names:
            idx, kind = layer_position(n)
            rec = records[n]
            layers.append(
                LayerError(
                    name=n,
                    index=idx,
                    kind=kind,
                    shape=[rec.out_features, rec.in_features],
                    wbits=rec.wbits,
                    sqnr_db=round(dq[n][0], 4),
                    rtn_sqnr_db=None if n not in rtn_sqnr else round(rtn_sqnr[n], 4),
                    rows=dq[n][1],
                )
            )
        return ModelMetrics(
            model=self.model_name,
            fingerprint=self.fingerprint,
            preset=label or config.preset,
            settings=numeric_settings(config),
            protocol=self.protocol(config),
            output=OutputError.between(fp_states, q_states),
            output_rtn=output_rtn,
            layers=layers,
            bytes_before=report.bytes_before,
            bytes_after=report.bytes_after,
            info={
                "peak_memory_bytes": mem.peak_bytes,
                "peak_memory_kind": mem.kind,
                "model_bytes_in_memory_quantized": quant_bytes,
                "seconds": round(time.perf_counter() - t0, 2),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        )


class PolicyProbe(Probe):
    """pi0.5 policy probe. Calibration calls are those of `session.quantize_and_calibrate`; evaluation is
    one batched call on `eval_obs` with noise seeds `eval_seeds`, recording every denoising step."""

    def __init__(
        self,
        policy,
        *,
        calib_obs: Sequence[dict] | None = None,
        eval_obs: Sequence[dict] | None = None,
        eval_seeds: Sequence[int] | None = None,
        fingerprint: str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        from pytest_duquant.policies.session import default_calibration_observations, policy_module

        self.policy = policy
        model = policy_module(policy)
        if dtype is not None:  # e.g. float64: the golden then pins the quantization, not the CPU's float order
            model.set_precision(str(dtype).removeprefix("torch."))
        super().__init__(
            model,
            fingerprint=fingerprint or getattr(policy, "fingerprint", "unknown"),
            device=getattr(policy, "device", "cpu"),
            **kwargs,
        )
        self.calib_obs = list(calib_obs) if calib_obs is not None else default_calibration_observations()
        if eval_obs is None:
            from pytest_duquant.policies.pi05.processing import synthetic_observations

            eval_obs = synthetic_observations(EVAL_OBS, EVAL_OBS_SEED)
        self.eval_obs = list(eval_obs)
        self.eval_seeds = list(eval_seeds) if eval_seeds is not None else list(range(len(self.eval_obs)))
        cfg = getattr(policy, "config", None)
        self.action_dims = int(getattr(cfg, "output_action_dim", 7))
        self.model_name = f"pi05:{getattr(cfg, 'variant', 'unknown')}"

    @contextlib.contextmanager
    def extra_context(self):
        from pytest_duquant.policies.session import reuse_prefix

        with reuse_prefix(self.policy):
            yield

    def calibration_calls(self, calls: int) -> None:
        from pytest_duquant.policies.session import run_calibration_calls

        run_calibration_calls(self.policy, self.calib_obs, calls)

    def evaluate(self) -> list[torch.Tensor]:
        with record_denoising(self.model) as seen:
            final = self.policy.raw_actions(self.eval_obs, self.eval_seeds)
        states = [s[..., : self.action_dims] for s in seen[1:]] + [
            final.to(torch.promote_types(final.dtype, torch.float32))[..., : self.action_dims]
        ]
        return [s.cpu() for s in states]

    def protocol(self, config: DuQuantConfig) -> dict:
        from pytest_duquant.policies.session import CALIB_NOISE_SEED, tokenizer_digest

        return {
            "calibration": {
                "observations": len(self.calib_obs),
                "calls": config.calib_steps,
                "noise_seed_start": CALIB_NOISE_SEED,
                "source": "synthetic_observations(8, seed=0)",
            },
            "evaluation": {
                "observations": len(self.eval_obs),
                "noise_seeds": self.eval_seeds,
                "source": f"synthetic_observations({EVAL_OBS}, seed={EVAL_OBS_SEED})",
                "units": f"normalized actions, first {self.action_dims} dims",
            },
            "sqnr_inputs": {"calls": self.sqnr_calls, "max_rows": self.max_rows},
            "tokenizer": tokenizer_digest(self.policy),
            "dtype": str(getattr(self.model, "compute_dtype", "unknown")).removeprefix("torch."),
        }


EVAL_OBS = 8
EVAL_OBS_SEED = 1


class MiniLMProbe(Probe):
    """all-MiniLM-L6-v2: calibration call i embeds CALIBRATION_SENTENCES[i mod 16]; evaluation embeds the
    EVALUATION_SENTENCES (error of the normalized sentence embeddings).

    Runs in float64 by default (`dtype`): in float32 the order of float operations (the CPU's vector width,
    the BLAS build) moves a few activation codes across a rounding boundary, the flips compound through the
    six layers, and the embedding error's max abs moved by up to 6% between machines. In float64 the same
    measurement agrees to 1e-13 across those machines, so the golden pins the quantization, not the CPU
    (docs/model-suite.md, "Reproducibility").
    """

    def __init__(self, model=None, tokenizer=None, *, dtype: torch.dtype = torch.float64, **kwargs):
        from pytest_duquant.policies import minilm

        if model is None:
            model, tokenizer = minilm.load_minilm()
        model = model.to(dtype)
        self.dtype = dtype
        self.tok = tokenizer
        self.minilm = minilm
        self.calib = [tokenizer.batch([s]) for s in minilm.CALIBRATION_SENTENCES]
        self.eval_batch = tokenizer.batch(minilm.EVALUATION_SENTENCES)
        kwargs.setdefault("sqnr_calls", len(minilm.CALIBRATION_SENTENCES))
        super().__init__(model, fingerprint=minilm.MINILM_NAME, **kwargs)
        self.model_name = minilm.MINILM_NAME

    def scoped(self, config: DuQuantConfig) -> DuQuantConfig:
        return (
            replace(config, scope=self.minilm.MINILM_SCOPE)
            if config.scope != self.minilm.MINILM_SCOPE
            else config
        )

    def calibration_calls(self, calls: int) -> None:
        with torch.no_grad():
            for i in range(calls):
                self.model(**self.calib[i % len(self.calib)])

    def evaluate(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.model.embed(**self.eval_batch)]

    def protocol(self, config: DuQuantConfig) -> dict:
        return {
            "calibration": {"sentences": len(self.calib), "calls": config.calib_steps},
            "evaluation": {
                "sentences": len(self.minilm.EVALUATION_SENTENCES),
                "units": "L2-normalized embeddings",
            },
            "sqnr_inputs": {"calls": self.sqnr_calls, "max_rows": self.max_rows},
            "weights_sha": self.minilm.weights_fingerprint(),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def preset_configs(
    presets: Sequence[str], rotations: Sequence[str] = ("svd", "greedy"), base: DuQuantConfig | None = None
) -> list[tuple[str, DuQuantConfig]]:
    """(label, config) for each preset x rotation; label is the preset, plus '-greedy' for greedy."""
    out = []
    for p in presets:
        cfg = from_env({}, preset=p) if base is None or base.preset.lower() != p.lower() else base
        if not cfg.enabled:
            continue
        for rot in rotations:
            c = cfg if cfg.rotation == rot else replace(cfg, rotation=rot)
            out.append((cfg.preset if rot == "svd" else f"{cfg.preset}-{rot}", c))
    return out


#: settings that change plain RTN (the transforms do not)
_NOT_RTN = ("rotation", "block", "block_out", "ls", "permute", "row_rot")


def _rtn_key(probe: Probe, config: DuQuantConfig) -> str:
    settings = numeric_settings(probe.scoped(config))
    return json.dumps({k: v for k, v in settings.items() if k not in _NOT_RTN}, sort_keys=True)


def _borrow_rtn(m: ModelMetrics, donor: ModelMetrics) -> None:
    m.output_rtn = donor.output_rtn
    rtn = {la.name: la.rtn_sqnr_db for la in donor.layers}
    for la in m.layers:
        la.rtn_sqnr_db = rtn.get(la.name)


class Measurements:
    """probe.measure, cached by numeric settings for a session; RTN measured once per RTN-relevant group
    (a measurement without RTN is completed when RTN is asked). ``all()``: everything measured so far."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.cache: dict[str, ModelMetrics] = {}

    def key(self, config: DuQuantConfig) -> str:
        return json.dumps(numeric_settings(self.probe.scoped(config)), sort_keys=True)

    def _rtn_donor(self, config: DuQuantConfig) -> ModelMetrics | None:
        want = _rtn_key(self.probe, config)
        for m in self.cache.values():
            if m.output_rtn is not None and json.dumps(
                {k: v for k, v in m.settings.items() if k not in _NOT_RTN}, sort_keys=True
            ) == want:
                return m
        return None

    def __call__(self, config: DuQuantConfig, *, rtn: bool = False, label: str | None = None) -> ModelMetrics:
        k = self.key(config)
        m = self.cache.get(k)
        donor = self._rtn_donor(config) if rtn else None
        if m is None:
            m = self.probe.measure(config, rtn=rtn and donor is None, label=label)
            self.cache[k] = m
        if rtn and m.output_rtn is None:
            if donor is None:
                m = self.cache[k] = self.probe.measure(config, rtn=True, label=label)
            else:
                _borrow_rtn(m, donor)
        return m

    def name(self, config: DuQuantConfig) -> str:
        """Golden file stem for `config`: the preset, `<preset>-<rotation>`, or `<preset>-custom-<hash8>`."""
        pure = numeric_settings(self.probe.scoped(from_env({}, preset=config.preset)))
        return golden_name(config.preset, numeric_settings(self.probe.scoped(config)), pure)

    def all(self) -> list[ModelMetrics]:
        return list(self.cache.values())


def measure_policy(make_policy: Callable[[], object], configs: Sequence[tuple[str, DuQuantConfig]]) -> list:
    """collect_metrics on a fresh policy from `make_policy` (a policy_factory: carries the fingerprint)."""
    probe = PolicyProbe(make_policy(), fingerprint=getattr(make_policy, "fingerprint", None))
    try:
        return collect_metrics(probe, configs)
    finally:
        probe.close()


def collect_metrics(
    probe: Probe, configs: Sequence[tuple[str, DuQuantConfig]], *, progress: Callable[[str], None] | None = None
) -> list[ModelMetrics]:
    """Measure each (label, config); RTN only once per RTN-relevant setting group."""
    out = []
    rtn_done: dict[str, ModelMetrics] = {}
    for label, cfg in configs:
        if progress:
            progress(f"{probe.model_name}: {label}")
        key = _rtn_key(probe, cfg)
        m = probe.measure(cfg, rtn=key not in rtn_done, label=label)
        if key in rtn_done:
            _borrow_rtn(m, rtn_done[key])
        else:
            rtn_done[key] = m
        out.append(m)
    return out
