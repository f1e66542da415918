"""Model-level quantization metrics (no pytest): output error, per-layer SQNR vs plain RTN, bytes, memory.

What is measured, for one FP model and one DuQuantConfig (`Probe.measure`):
- the output error of the quantized model vs the FP model on fixed evaluation inputs: for pi0.5 the action
  chunk (normalized model units, the first `output_action_dim` = 7 dims that LIBERO uses), same noise seeds,
  relative L2 and max abs after every denoising step and at the end; for MiniLM the sentence embeddings;
- per-layer SQNR (dB) of every quantized linear on its real calibration inputs: the FP model's inputs to
  that layer, captured with forward hooks over the calibration calls, fed to the quantized layer and to
  the FP linear (reference computed in float64). SQNR = 10 log10(sum y^2 / sum (y - y_q)^2);
- the same for plain RTN at the same bits with no transforms (`RTNLinear`: per-output-channel weight RTN,
  scale max|w| / qmax, and the same activation scheme on the untransformed input: static per-input-channel
  ACT_PCT percentile scale calibrated on the same calls, or per-token when ACT_DYNAMIC), and the output
  error of the whole model under RTN;
- weight bytes of the selected layers before (their dtype) and after as a packed format stores them
  (`DuQuantLinear.packed_bytes()`: int codes + fp16 scales + transforms), the process's peak RSS during
  the quantized evaluation (CUDA: max_memory_allocated), informational only.

Each variant is measured by swapping the selected linears of the one FP model in place and restoring them
afterwards, so the FP model is built once and its reference outputs and layer inputs are computed once.
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pytest_duquant import progress
from pytest_duquant.config import DuQuantConfig, replace
from pytest_duquant.layer import DuQuantLinear
from pytest_duquant.numerics import PercentileObserver, fake_quant_sym, quantize_weight_rtn
from pytest_duquant.numerics.quantizers import fake_quant_per_token
from pytest_duquant.quantize import quantize_model
from pytest_duquant.selection import linear_choices

SQNR_CAP_DB = 200.0
# Config fields that change the measured numbers (a golden is recorded for one combination of these).
NUMERIC_SETTINGS = (
    "scope",
    "include",
    "exclude",
    "layers",
    "include_action_head",
    "wbits_default",
    "wbits",
    "abits",
    "act_pct",
    "calib_steps",
    "block",
    "block_out",
    "ls",
    "permute",
    "row_rot",
    "act_dynamic",
    "rotation",
)
PROJ_KINDS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "out_proj",
    "dense",
)


def numeric_settings(config: DuQuantConfig) -> dict:
    """The settings of `config` that change the numbers (JSON-ready; block_out resolved)."""
    out = {}
    for name in NUMERIC_SETTINGS:
        value = config.effective_block_out if name == "block_out" else getattr(config, name)
        if isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[name] = value
    return out


# ---- small math --------------------------------------------------------------------------------
def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - test||^2) in float64, capped at SQNR_CAP_DB."""
    r = ref.detach().to(torch.float64)
    e = (r - test.detach().to(torch.float64)).pow(2).sum().item()
    s = r.pow(2).sum().item()
    if e <= 0.0:
        return SQNR_CAP_DB
    if s <= 0.0:
        return -SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, 10.0 * math.log10(s / e)))


def layer_position(name: str) -> tuple[int | None, str]:
    """(layer index from '.layers.N.' / '.layer.N.', projection kind = last name component)."""
    m = re.search(r"\.layers?\.(\d+)\.", "." + name + ".")
    kind = name.rsplit(".", 1)[-1]
    return (int(m.group(1)) if m else None), kind


@dataclass
class OutputError:
    """Error of a quantized model's output vs the FP output (same inputs, same noise)."""

    rel_l2: float
    max_abs: float
    per_step_rel_l2: list[float] = field(default_factory=list)
    per_step_max_abs: list[float] = field(default_factory=list)

    @classmethod
    def between(cls, ref_states: Sequence[torch.Tensor], test_states: Sequence[torch.Tensor]) -> OutputError:
        """States: one tensor per step (the last is the final output)."""
        rel, mx = [], []
        for r, t in zip(ref_states, test_states, strict=True):
            r64, t64 = r.to(torch.float64), t.to(torch.float64)
            d = t64 - r64
            rel.append(float(d.norm() / r64.norm().clamp_min(1e-30)))
            mx.append(float(d.abs().max()))
        many = len(rel) > 1
        return cls(rel[-1], mx[-1], rel if many else [], mx if many else [])


@dataclass
class LayerError:
    name: str
    index: int | None
    kind: str
    shape: list[int]  # [out, in]
    wbits: int
    sqnr_db: float  # DuQuant layer vs FP layer, on the FP model's calibration inputs
    rtn_sqnr_db: float | None  # plain RTN (same bits, same activation scheme, no transforms)
    rows: int  # input rows the SQNR was measured on

    @property
    def gain_db(self) -> float | None:
        return None if self.rtn_sqnr_db is None else self.sqnr_db - self.rtn_sqnr_db


@dataclass
class ModelMetrics:
    model: str  # "pi05:dummy", "minilm-l6-v2"
    fingerprint: str
    preset: str
    settings: dict
    protocol: dict
    output: OutputError
    output_rtn: OutputError | None
    layers: list[LayerError]
    bytes_before: int
    bytes_after: int
    info: dict = field(default_factory=dict)

    @property
    def mean_sqnr_db(self) -> float:
        return float(sum(la.sqnr_db for la in self.layers) / max(1, len(self.layers)))

    @property
    def mean_rtn_sqnr_db(self) -> float | None:
        vals = [la.rtn_sqnr_db for la in self.layers if la.rtn_sqnr_db is not None]
        return float(sum(vals) / len(vals)) if vals else None

    def layer(self, name: str) -> LayerError:
        for la in self.layers:
            if la.name == name:
                return la
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_sqnr_db"] = self.mean_sqnr_db
        d["mean_rtn_sqnr_db"] = self.mean_rtn_sqnr_db
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelMetrics:
        return cls(
            model=d["model"],
            fingerprint=d["fingerprint"],
            preset=d["preset"],
            settings=d["settings"],
            protocol=d["protocol"],
            output=OutputError(**d["output"]),
            output_rtn=None if d.get("output_rtn") is None else OutputError(**d["output_rtn"]),
            layers=[LayerError(**la) for la in d["layers"]],
            bytes_before=d["bytes_before"],
            bytes_after=d["bytes_after"],
            info=dict(d.get("info") or {}),
        )

    def summary_row(self) -> dict:
        return {
            "preset": self.preset,
            "rotation": self.settings.get("rotation"),
            "rel_l2": self.output.rel_l2,
            "max_abs": self.output.max_abs,
            "rtn_rel_l2": None if self.output_rtn is None else self.output_rtn.rel_l2,
            "mean_sqnr_db": self.mean_sqnr_db,
            "mean_rtn_sqnr_db": self.mean_rtn_sqnr_db,
            "layers_better_than_rtn": sum(1 for la in self.layers if (la.gain_db or 0.0) > 0.0),
            "layers": len(self.layers),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


# ---- plain RTN baseline ------------------------------------------------------------------------
class RTNLinear(nn.Module):
    """Plain round-to-nearest: per-output-channel weight RTN, activation quantization on the raw input."""

    def __init__(
        self,
        linear: nn.Linear,
        *,
        name: str,
        wbits: int,
        abits: int,
        act_pct: float,
        act_dynamic: bool = False,
    ):
        super().__init__()
        self.name, self.wbits, self.abits, self.act_dynamic = name, wbits, abits, act_dynamic
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if wbits < 16:
            codes, scales = quantize_weight_rtn(w, wbits)
            wq = codes.to(torch.float32) * scales[:, None]
        else:
            wq = w
        self.register_buffer("weight_q", wq.to(w.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.observer = PercentileObserver(act_pct)
        self.calibrating = False
        self.register_buffer("act_scale", None)

    @property
    def act_quant_enabled(self) -> bool:
        return 0 < self.abits < 16

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quant_enabled:
            return x
        if self.act_dynamic:
            return fake_quant_per_token(x, self.abits)
        if self.act_scale is None or self.calibrating:
            with torch.no_grad():
                self.observer.observe(x)
            scale = self.observer.scale(self.abits).to(x.device)
        else:
            scale = self.act_scale
        return fake_quant_sym(x, scale.to(x.dtype), self.abits)

    def freeze(self) -> None:
        if self.observer.running is not None and self.act_quant_enabled and not self.act_dynamic:
            self.act_scale = self.observer.scale(self.abits).to(self.weight_q.device, self.weight_q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight_q, self.bias)


def rtn_quantize_model(model: nn.Module, config: DuQuantConfig) -> list[str]:
    """Replace the linears `config` selects with RTNLinear (same bits, same activation scheme). -> names."""
    names = []
    for choice in linear_choices(model, config):
        if not choice.selected:
            continue
        linear = model.get_submodule(choice.name)
        _set_submodule(
            model,
            choice.name,
            RTNLinear(
                linear,
                name=choice.name,
                wbits=choice.wbits,
                abits=config.abits,
                act_pct=config.act_pct,
                act_dynamic=config.act_dynamic,
            ),
        )
        names.append(choice.name)
    return names


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Like quantize.calibration, for DuQuantLinear and RTNLinear: observe every call, freeze on exit."""
    layers = [m for m in model.modules() if isinstance(m, (DuQuantLinear, RTNLinear))]
    for layer in layers:
        layer.calibrating = True
    try:
        with torch.no_grad():
            yield
    finally:
        for layer in layers:
            layer.calibrating = False
            layer.freeze()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


# ---- capture and memory ------------------------------------------------------------------------
class InputCapture:
    """Forward pre-hooks keeping the first positional input of named modules, flattened to rows.

    At most `max_rows` rows per module: when more arrive, every second row is dropped (deterministic,
    spread over all calls)."""

    def __init__(self, model: nn.Module, names: Sequence[str], max_rows: int = 4096):
        self.model, self.names, self.max_rows = model, list(names), max_rows
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.count: dict[str, int] = dict.fromkeys(self.names, 0)
        self.stride: dict[str, int] = dict.fromkeys(self.names, 1)
        self._handles = []

    def __enter__(self) -> InputCapture:
        for name in self.names:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            start = (-self.count[name]) % self.stride[name]
            self.count[name] += x.shape[0]
            self.rows[name].append(x[start :: self.stride[name]].clone())
            if sum(r.shape[0] for r in self.rows[name]) > self.max_rows:
                merged = torch.cat(self.rows[name])[::2]
                self.rows[name] = [merged]
                self.stride[name] *= 2

        return hook

    def inputs(self) -> dict[str, torch.Tensor]:
        return {n: torch.cat(r) for n, r in self.rows.items() if r}


def _read_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory inside the block: CUDA max_memory_allocated, else the process's peak RSS (Linux VmHWM
    after resetting it via /proc/self/clear_refs; elsewhere a 5 ms RSS sampler)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
            return self
        self._stop = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _read_hwm_kib() is not None:
                self.kind = "rss_peak(VmHWM)"
                return self
        except OSError:
            pass
        self.kind = "rss_peak(sampled)"
        self._samples = [0]
        self._stop = threading.Event()

        def sample():
            try:
                import psutil

                proc = psutil.Process()
                while not self._stop.is_set():
                    self._samples.append(proc.memory_info().rss)
                    self._stop.wait(0.005)
            except ImportError:
                return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._stop is None:
            self.peak_bytes = (_read_hwm_kib() or 0) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._samples) or None


def module_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers held in memory (fake-quant copies included)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def record_denoising(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the noisy actions x_t entering every `denoise_step` call of a pi0.5 model."""
    seen: list[torch.Tensor] = []
    orig = model.denoise_step

    def denoise_step(kv_cache, prefix_pad, x_t, time):
        seen.append(x_t.detach().to(torch.promote_types(x_t.dtype, torch.float32)).clone())
        return orig(kv_cache, prefix_pad, x_t, time)

    model.denoise_step = denoise_step
    try:
        yield seen
    finally:
        del model.denoise_step


# ---- probes ------------------------------------------------------------------------------------
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
            _set_submodule(self.model, name, module)

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
                with calibrating(self.model):
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
                    rtn_quantize_model(self.model, config)
                    with self.running():
                        with calibrating(self.model):
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


def measure_presets(
    probe: Probe,
    configs: Sequence[tuple[str, DuQuantConfig]],
    *,
    rtn: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[ModelMetrics]:
    """probe.measure for each (label, config)."""
    out = []
    for label, cfg in configs:
        if progress:
            progress(label)
        out.append(probe.measure(cfg, rtn=rtn, label=label))
    return out
