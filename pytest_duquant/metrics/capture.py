"""Watching a model run: its layers' inputs (forward pre-hooks), its denoising states, its memory."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn


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
