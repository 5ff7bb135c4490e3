"""PeakMemory: sees a freed 400 MB tensor, resets between blocks, nests; format_bytes."""

import time

import pytest
import torch

from noisecraft.errors import NoisecraftError
from noisecraft.memory import PeakMemory, format_bytes

MB = 2 ** 20
CPU_METHODS = [None, pytest.param("sampling", marks=pytest.mark.skipif(
    not __import__("os").path.exists("/proc/self/statm"), reason="sampling needs /proc"))]


def _spike(device="cpu"):
    """Allocate 400 MiB, touch every page, hold it a moment (for the sampler), free it."""
    big = torch.ones(100 * MB, device=device)     # 100 Mi float32 = 400 MiB
    time.sleep(0.05)
    del big


@pytest.mark.parametrize("method", CPU_METHODS)
def test_cpu_peak_sees_a_freed_tensor_and_resets(method):
    with PeakMemory("cpu", method=method) as spike:
        _spike()
    if spike.method in ("getrusage", "unavailable"):
        pytest.skip(f"no resettable peak counter here ({spike.method})")
    with PeakMemory("cpu", method=method) as empty:
        pass
    with PeakMemory("cpu", method=method) as again:
        _spike()
    assert spike.method == (method or spike.method) and spike.method in ("vmhwm", "sampling")
    assert spike.peak_bytes >= 350 * MB
    assert spike.peak_total_bytes >= spike.peak_bytes + spike.start_bytes - MB
    assert empty.peak_bytes < 50 * MB            # the reset forgot the first spike
    assert 350 * MB <= again.peak_bytes < spike.peak_bytes + 100 * MB


def test_nested_blocks_keep_the_outer_peak():
    with PeakMemory() as outer:
        with PeakMemory() as inner:
            _spike()
        with PeakMemory() as after:             # a second reset inside the outer block
            pass
    assert inner.peak_bytes >= 350 * MB
    assert after.peak_bytes < 50 * MB
    assert outer.peak_bytes >= 350 * MB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak():
    with PeakMemory("cuda") as spike:
        _spike("cuda")
    with PeakMemory(torch.device("cuda")) as empty:
        pass
    assert spike.method == "cuda"
    assert spike.peak_bytes >= 400 * MB and empty.peak_bytes == 0


def test_bad_method_raises():
    with pytest.raises(NoisecraftError, match="unknown"):
        PeakMemory("cpu", method="psutil")
    with pytest.raises(NoisecraftError, match="does not fit"):
        PeakMemory("cpu", method="cuda")


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(512 * MB) == "512.0 MiB"
    assert format_bytes(int(1.23 * 2 ** 30)) == "1.23 GiB"
    assert format_bytes(2 ** 30 - 1) == "1.00 GiB"       # rounds up into the next unit, not "1024.0 MiB"
    assert format_bytes(-3 * MB) == "-3.00 MiB"
    assert format_bytes(5 * 2 ** 50 * 2048) == "10240.0 PiB"
    with pytest.raises(NoisecraftError):
        format_bytes("1 GB")
