"""The largest network noisecraft builds from a config: far above any real one (Stable Diffusion XL's U-Net has
2.6e9 parameters), so that a corrupted or hostile config (base_channels = 10^9) fails with a clear sentence before a
single weight is allocated, instead of exhausting the memory.

A config is sized in two steps: a coarse lower bound from its largest weights refuses absurd settings before anything
is built, then the model is built on the meta device (shapes without memory) and its parameters are counted, so the
count is exact and there is no second description of the architecture to keep in step with the modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import NoisecraftError

MAX_PARAMETERS = 2 ** 33


def check_parameter_count(build: Callable[[], nn.Module], at_least: int, what: str, fix: str) -> int:
    """The parameter count of build()'s model, refusing more than MAX_PARAMETERS: first from `at_least` (a lower
    bound from the settings alone, so that absurd settings build nothing), then from the model built on the meta
    device. `what` names the model ("a U-Net"), `fix` says which settings to lower."""
    coarse = at_least > MAX_PARAMETERS
    n = at_least if coarse else parameter_count(build)
    if n > MAX_PARAMETERS:
        raise NoisecraftError(f"these settings give {what} of {'at least ' if coarse else ''}{n:.3g} parameters, "
                              f"more than the {MAX_PARAMETERS:.3g} noisecraft builds; {fix}.")
    return n


def parameter_count(build: Callable[[], nn.Module]) -> int:
    """The parameters of the model build() returns, built on the meta device: shapes only, no memory, no init."""
    with torch.device("meta"), _NoInit():
        return sum(p.numel() for p in build().parameters())


class _NoInit(TorchFunctionMode):
    """Skip torch.nn.init's in-place fills: a meta tensor has no numbers to fill, and torch would run them through its
    slow reference implementations (normal_ even imports torch._dynamo, seconds, the first time)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))
