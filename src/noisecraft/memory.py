"""Peak memory of a block of code, on a CUDA device or in the process's resident memory.

    with PeakMemory("cpu") as m:
        image = tiled_decode(vae, z)
    print(format_bytes(m.peak_bytes), m.method)

Used to compare the memory of memory-saving options (VAE tiling, attention slicing, half precision) with the plain
path. Blocks may be nested: an inner block's reset is folded into the outer one's record first.
"""

from __future__ import annotations

import os
import re
import sys
import threading

import torch

from .errors import NoisecraftError

SAMPLE_INTERVAL_S = 0.005
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

_active: list["PeakMemory"] = []      # open blocks whose counter a new block's reset would clear
_active_lock = threading.Lock()


def physical_memory() -> int | None:
    """Bytes of RAM in this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: int) -> str:
    """A byte count in binary units, two decimals below 10 and one above: 512 → "512 B", 1.5·2²⁰ → "1.50 MiB",
    512·2²⁰ → "512.0 MiB", 2³⁰ → "1.00 GiB"."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise NoisecraftError(f"format_bytes needs a number of bytes, got {n!r}.")
    sign, value = ("-" if n < 0 else ""), abs(n)
    if value < 1024:
        return f"{sign}{value:.0f} B"
    for unit in _UNITS[1:]:
        value /= 1024
        digits = 2 if value < 10 else 1
        if round(value, digits) < 1024 or unit == _UNITS[-1]:
            return f"{sign}{value:.{digits}f} {unit}"


# ---- reading the process's resident set size (Linux /proc, else getrusage) ----

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _current_rss() -> int | None:
    """Resident set size now, from /proc/self/statm (pages), or None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _reset_hwm() -> bool:
    """Reset the kernel's high-water mark VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _max_rss_ever() -> int | None:
    """The process's lifetime peak RSS from getrusage (KiB on Linux, bytes on macOS), or None without `resource`."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Context manager measuring the peak memory during its block.

    After the block, `peak_total_bytes` is the highest level reached and `peak_bytes` the part above the level at
    entry (`start_bytes`); `method` says how it was measured:

    - "cuda": a CUDA device; torch's allocator counters (reset_peak_memory_stats, then max_memory_allocated). Counts
      tensors only, not the allocator's cache or the CUDA context. Synchronises the device at entry and exit.
    - "vmhwm": any other device, on Linux: the kernel's exact high-water mark of resident memory, reset at entry by
      writing "5" to /proc/self/clear_refs and read from VmHWM in /proc/self/status at exit. Whole process.
    - "sampling": where that reset is refused but /proc/self/statm exists: a background thread reads the RSS every
      ~5 ms, so a spike shorter than that can be missed.
    - "getrusage": no /proc (macOS): the growth of the lifetime peak RSS — a lower bound, 0 when the block stayed
      below an earlier peak.
    - "unavailable": none of the above (Windows without psutil); all numbers stay 0.

    Other devices (e.g. "mps") are measured through the process's resident memory, which may not include them.
    """

    def __init__(self, device: str | torch.device | None = None, method: str | None = None):
        self.device = torch.device("cpu" if device is None else device)
        if method is not None and method not in ("cuda", "vmhwm", "sampling", "getrusage"):
            raise NoisecraftError(f"unknown PeakMemory method {method!r}; use cuda, vmhwm, sampling or getrusage.")
        if method is not None and (method == "cuda") != (self.device.type == "cuda"):
            raise NoisecraftError(f"PeakMemory method {method!r} does not fit device {self.device}; "
                                  f"leave method unset to pick the one for the device.")
        self._requested = method
        self.method = method
        self.start_bytes = self.peak_bytes = self.peak_total_bytes = 0
        self._seen = 0                    # highest level recorded before a nested block's reset (or sampled)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the counter that a reset clears: one per CUDA device, one for the process's VmHWM
    def _channel(self):
        return ("cuda", self.device.index) if self.method == "cuda" else self.method

    def _read_peak(self) -> int:
        if self.method == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") or 0

    def __enter__(self) -> "PeakMemory":
        self.method, self._seen, self._stop = self._requested, 0, threading.Event()
        self.start_bytes = self.peak_bytes = self.peak_total_bytes = 0
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.method = "cuda"
            torch.cuda.synchronize(self.device)
        with _active_lock:
            if self.method in (None, "vmhwm"):
                # fold the current peak into open blocks before clearing it, so nesting keeps them right
                before = _status_kib("VmHWM") or 0
                if _reset_hwm():
                    self.method = "vmhwm"
                elif self.method == "vmhwm":
                    raise NoisecraftError("cannot reset VmHWM through /proc/self/clear_refs here; "
                                          "use PeakMemory(method='sampling') or leave method unset.")
                else:
                    self.method = "sampling" if _current_rss() is not None else "getrusage"
            elif self.method == "cuda":
                before = self._read_peak()
                torch.cuda.reset_peak_memory_stats(self.device)
            if self.method in ("vmhwm", "cuda"):
                for other in _active:
                    if other._channel() == self._channel():
                        other._seen = max(other._seen, before)
                _active.append(self)
        if self.method == "cuda":
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        elif self.method == "vmhwm":
            self.start_bytes = _current_rss() or self._read_peak()
        elif self.method == "sampling":
            if _current_rss() is None:
                raise NoisecraftError("cannot sample the resident memory without /proc/self/statm; "
                                      "leave the PeakMemory method unset.")
            self.start_bytes = self._seen = _current_rss()
            self._thread = threading.Thread(target=self._sample, name="PeakMemory", daemon=True)
            self._thread.start()
        else:
            ever = _max_rss_ever()
            self.method = "getrusage" if ever is not None else "unavailable"
            self.start_bytes = self._seen = ever or 0
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._seen = max(self._seen, _current_rss() or 0)

    def __exit__(self, *exc) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
        if self.method in ("cuda", "vmhwm"):
            with _active_lock:
                total = max(self._seen, self._read_peak())
                _active.remove(self)
        elif self.method == "sampling":
            self._stop.set()
            self._thread.join()
            total = max(self._seen, _current_rss() or 0)
        elif self.method == "getrusage":
            total = _max_rss_ever() or 0
        else:
            total = 0
        self.peak_total_bytes = max(total, self.start_bytes)
        self.peak_bytes = self.peak_total_bytes - self.start_bytes

    def __repr__(self) -> str:
        return (f"PeakMemory({self.device}, method={self.method}, peak={format_bytes(self.peak_bytes)} above "
                f"{format_bytes(self.start_bytes)}, total {format_bytes(self.peak_total_bytes)})")
