"""quantize_model(model, config): select, replace, report — one entry, a handler per method (as torchao's
``quantize_(model, config)``): a DuQuantConfig quantizes with DuQuant (packs cached by content), an
RTNConfig with plain round-to-nearest (baselines/rtn.py). Also explicit calibration of either."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pytest_duquant import progress as _progress
from pytest_duquant.baselines.rtn import RTNConfig, rtn_layer
from pytest_duquant.config import DuQuantConfig, from_env
from pytest_duquant.layer import DuQuantLinear, group_siblings  # group_siblings: re-exported
from pytest_duquant.packs import PackCache, build_pack, pack_key
from pytest_duquant.selection import LinearChoice, linear_choices, unmatched_layer_names

log = logging.getLogger("duquant")


class DuQuantError(RuntimeError):
    """quantize_model cannot do what was asked (e.g. a selected layer is already quantized)."""


@dataclass
class LayerRecord:
    name: str
    out_features: int
    in_features: int
    wbits: int
    abits: int
    block: int
    block_out: int
    permute: bool
    row_rot: str
    bytes_before: int
    bytes_after: int
    seconds: float
    cached: bool
    method: str = "duquant"


@dataclass
class QuantReport:
    """What quantize_model did (or, in a dry run, would do)."""

    preset: str
    dryrun: bool
    config: str
    plan: list[LinearChoice] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def selected(self) -> list[str]:
        return [c.name for c in self.plan if c.selected]

    @property
    def params(self) -> int:
        return sum(c.in_features * c.out_features for c in self.plan if c.selected)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def summary(self) -> str:
        if self.dryrun:
            return (f"DuQuant dry run ({self.preset}): {len(self.selected)} of {len(self.plan)} linears would be "
                    f"quantized, {self.params / 1e6:.2f} M params; nothing changed")
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        return (f"DuQuant ({self.preset}): {len(self.layers)} layers, {self.params / 1e6:.2f} M params, "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x), "
                f"{self.seconds:.2f} s")

    def table(self) -> str:
        rows = [f"{'layer':<64} {'shape':>11} {'bits':>6} {'block':>9} {'MiB before':>10} {'after':>7}"]
        if self.dryrun or not self.layers:
            for c in self.plan:
                mark = f"W{c.wbits}" if c.selected else "-"
                rows.append(f"{c.name:<64} {c.out_features:>5}x{c.in_features:<5} {mark:>6} {c.reason}")
            return "\n".join(rows)
        for r in self.layers:
            rows.append(f"{r.name:<64} {r.out_features:>5}x{r.in_features:<5} W{r.wbits}A{r.abits:<2} "
                        f"{r.block:>4}/{r.block_out:<4} {r.bytes_before / 2**20:>10.2f} {r.bytes_after / 2**20:>7.2f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "dryrun": self.dryrun,
            "config": self.config,
            "plan": [c.to_dict() for c in self.plan],
            "layers": [asdict(r) for r in self.layers],
            "seconds": self.seconds,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model` (replacing what is there)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


QuantConfig = DuQuantConfig | RTNConfig


def quantize_model(model: nn.Module, config: QuantConfig | None = None, *, dryrun: bool | None = None,
                   progress: bool = False) -> QuantReport:
    """Replace the layers `config` selects, in place, by the method the config names. Returns a QuantReport.

    `config`: a DuQuantConfig (default: from the environment, `from_env()`) -> DuQuantLinear; an
    RTNConfig(base) -> RTNLinear on the layers, bits and activation scheme of `base`. With DRYRUN (or
    dryrun=True) the plan is returned and the model is left untouched. A selected layer that is already
    quantized raises DuQuantError before anything changes.
    """
    config = from_env() if config is None else config
    if not isinstance(config, (DuQuantConfig, RTNConfig)):
        raise TypeError(f"quantize_model: config must be a DuQuantConfig or an RTNConfig, got {type(config).__name__}")
    selection = config.base if isinstance(config, RTNConfig) else config
    if selection.debug:
        enable_debug_logging()
    dry = selection.dryrun if dryrun is None else dryrun
    start = time.perf_counter()
    plan = linear_choices(model, selection)
    report = QuantReport(preset=config.preset, dryrun=dry, config=config.describe(), plan=plan)
    if not config.enabled:
        log.info("DuQuant: preset fp, nothing quantized")
        return report
    for missing in unmatched_layer_names(plan, selection):
        log.warning("DuQuant: %r (from LAYERS/WBITS) names no nn.Linear of this model", missing)
    again = [c.name for c in plan if c.selected and c.quantized]
    if again:
        raise DuQuantError(
            f"{len(again)} selected layer(s) are already quantized (e.g. {again[0]}); quantizing twice "
            "would stack transforms. Quantize a fresh copy of the FP model instead."
        )
    selected = [c for c in plan if c.selected]
    log.info("DuQuant plan (%s): %d of %d linears selected", config.describe(), len(selected), len(plan))
    if dry:
        for c in selected:
            log.info("[dry run] would quantize %s [%d, %d] to W%d", c.name, c.out_features, c.in_features, c.wbits)
        report.seconds = time.perf_counter() - start
        return report
    _unfuse_parents(model, selected)
    handler = _RTN(config) if isinstance(config, RTNConfig) else _DuQuant(config)
    iterator = _progress.steps(selected, f"{'RTN' if isinstance(config, RTNConfig) else 'DuQuant'} {config.preset}: "
                               "quantizing", unit="linears")
    if progress:
        from tqdm import tqdm

        iterator = tqdm(selected, desc="DuQuant", unit="layer")
    handler.start(model, selected)
    try:
        _replace_all(model, iterator, handler, selection, report)
    finally:
        handler.finish()  # pack threads stop and torch gets its thread count back, also on an error
    if isinstance(config, DuQuantConfig) and config.backend == "triton":  # q/k/v and gate/up: one launch pair
        log.info("Grouped %d sets of sibling linears for the GPU kernels", group_siblings(model))
    report.seconds = time.perf_counter() - start
    log.info("%s", report.summary())
    return report


def _unfuse_parents(model: nn.Module, selected: list[LinearChoice]) -> None:
    """Selected layers whose weights are views into a fused tensor (pi0.5's fast-path projections,
    `Pi05Model.fuse_fast_projections`) get their own weights back first, with their siblings: a quantized layer
    must not keep the fused tensor alive, and the fused GEMM must not run a replaced layer's weight."""
    for c in selected:
        unfuse = getattr(model.get_submodule(c.name.rpartition(".")[0]), "unfuse_projections", None)
        if callable(unfuse):
            unfuse()


def _replace_all(model: nn.Module, iterator, handler, selection: DuQuantConfig, report: QuantReport) -> None:
    for choice in iterator:
        t0 = time.perf_counter()
        linear = model.get_submodule(choice.name)
        layer, cached = handler.layer(linear, choice)
        set_submodule(model, choice.name, layer)
        before = linear.weight.numel() * linear.weight.element_size()
        if linear.bias is not None:
            before += linear.bias.numel() * linear.bias.element_size()
        record = LayerRecord(
            name=choice.name, out_features=choice.out_features, in_features=choice.in_features, wbits=choice.wbits,
            abits=selection.abits if layer.act_quant_enabled else 16, bytes_before=before,
            bytes_after=layer.packed_bytes(), seconds=time.perf_counter() - t0, cached=cached, **handler.settings,
        )
        report.layers.append(record)
        log.info("Quantizing layer: %s", choice.name)
        log.info("Weight shape: [%d, %d]", choice.out_features, choice.in_features)
        log.info("Quantized to W%dA%d, %s%s", record.wbits, record.abits,
                 f"block={record.block}" if record.method == "duquant" else "plain RTN",
                 " (pack from cache)" if cached else "")
        log.info("Memory saved: %.1f MB", (record.bytes_before - record.bytes_after) / 1e6)
        scales = getattr(layer, "w_scales", None)
        if scales is not None:
            log.debug("  weight scales: min %.3g median %.3g max %.3g; %.3f s", float(scales.min()),
                      float(scales.median()), float(scales.max()), record.seconds)


def pack_workers() -> int:
    """Layers whose packs are built at once: one per thread torch may use (at most 8), each single-threaded.

    Independent layers in parallel, instead of each small op split over threads: no barrier between threads
    (on a busy 2-core machine a descheduled OpenMP thread stalled every op), and a pack never depends on the
    thread count (single-threaded reductions), so it is the same on every machine.
    """
    return max(1, min(8, torch.get_num_threads()))


class _DuQuant:
    """DuQuant's handler: build (or load from the content-keyed cache) each layer's pack, wrap the linear."""

    def __init__(self, config: DuQuantConfig):
        self.config = config
        self.cache = PackCache(config.packdir)
        self.pack_settings = config.pack_settings()
        block_out = config.effective_block_out
        self.settings = {"block": config.block, "block_out": block_out, "permute": config.permute,
                         "row_rot": config.row_rot, "method": "duquant"}

    def start(self, model: nn.Module, selected: list[LinearChoice]) -> None:
        """Load or build the packs of `selected`, in order, by `pack_workers()` threads a few layers ahead."""
        self._packs = self._load_or_build(model, selected)

    def finish(self) -> None:
        packs, self._packs = getattr(self, "_packs", None), None
        if packs is not None:
            packs.close()

    def _one(self, model: nn.Module, choice: LinearChoice):
        c = self.config
        weight = model.get_submodule(choice.name).weight
        key = pack_key(choice.name, weight, {**self.pack_settings, "wbits": choice.wbits})
        pack = self.cache.load(choice.name, key)
        cached = pack is not None
        if pack is None:
            pack = build_pack(weight, wbits=choice.wbits, block=c.block, block_out=c.effective_block_out,
                              ls=c.ls, permute=c.permute, row_rot=c.row_rot, rotation=c.rotation)
            self.cache.save(choice.name, key, pack)
        return pack, cached

    def _load_or_build(self, model: nn.Module, selected: list[LinearChoice]) -> Iterator[tuple]:
        workers = pack_workers()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if workers == 1:
                for choice in selected:
                    yield self._one(model, choice)
                return
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="duquant-pack") as pool:
                ahead = 2 * workers
                futures = [pool.submit(self._one, model, c) for c in selected[:ahead]]
                for i in range(len(selected)):
                    if i + ahead < len(selected):
                        futures.append(pool.submit(self._one, model, selected[i + ahead]))
                    yield futures[i].result()
                    futures[i] = None  # let the pack go once the layer holds it
        finally:
            torch.set_num_threads(threads)

    def layer(self, linear: nn.Linear, choice: LinearChoice) -> tuple[nn.Module, bool]:
        c = self.config
        pack, cached = next(self._packs)
        layer = DuQuantLinear.from_pack(
            linear, pack, name=choice.name, wbits=choice.wbits, abits=c.abits, block=c.block,
            block_out=c.effective_block_out, row_rot=c.row_rot, act_pct=c.act_pct, calib_steps=c.calib_steps,
            act_dynamic=c.act_dynamic, backend=c.backend,
        )
        return layer, cached


class _RTN:
    """Plain RTN's handler: no transform, nothing cached."""

    settings = {"block": 0, "block_out": 0, "permute": False, "row_rot": "0", "method": "rtn"}

    def __init__(self, config: RTNConfig):
        self.config = config

    def start(self, model: nn.Module, selected: list[LinearChoice]) -> None:
        pass

    def finish(self) -> None:
        pass

    def layer(self, linear: nn.Linear, choice: LinearChoice) -> tuple[nn.Module, bool]:
        return rtn_layer(linear, choice.name, choice.wbits, self.config), False


def enable_debug_logging() -> None:
    """OPENPI_DUQUANT_DEBUG=1: the `duquant` logger prints INFO lines to stderr (once)."""
    log.setLevel(logging.INFO)
    if not any(getattr(h, "_duquant", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[duquant] %(message)s"))
        handler._duquant = True
        log.addHandler(handler)


def duquant_layers(model: nn.Module) -> list[DuQuantLinear]:
    return [m for m in model.modules() if isinstance(m, DuQuantLinear)]


def calibrated_layers(model: nn.Module) -> list[nn.Module]:
    """The quantized layers of any method that calibrate activation scales (``calibrating`` + ``freeze()``)."""
    return [m for m in model.modules() if hasattr(m, "calibrating") and callable(getattr(m, "freeze", None))]


@contextlib.contextmanager
def calibration(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Observe every forward call of every quantized layer (DuQuant or RTN) inside the block; freeze all
    scales on exit.

    Use for calibration on real observations: every denoising step of every policy call is observed, and
    no layer freezes early (CALIB_STEPS then counts the policy calls the caller makes).
    """
    layers = calibrated_layers(model)
    for layer in layers:
        layer.calibrating = True
    try:
        with torch.no_grad():
            yield layers
    finally:
        for layer in layers:
            layer.calibrating = False
            layer.freeze()
