"""How a training step runs fast: mixed precision, torch.compile, the AdamW kernel, and DDP's wrapper.

None of these changes what is computed, only how: fp32 with the default options is the reference, and the
others are measured against it in benchmarks/train_speed.py (the U-Net itself always runs channels-last).

- precision "bf16": autocast to bfloat16 (CPU with AVX-512 bf16, or Ampere+ GPUs); no loss scaling needed, the
  exponent range is fp32's. "fp16": autocast to float16 with a GradScaler (GPUs), which multiplies the loss
  before backward so that small gradients do not flush to zero, and skips steps whose gradients overflowed.
- compile: torch.compile (TorchInductor) fuses the elementwise work around the convolutions; the first
  steps are slow while it compiles.
- adam: "fused" (one kernel for the whole update), "foreach" (one kernel per op over all tensors) or
  "loop" (torch's per-tensor reference loop).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import NoisecraftError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAM_KERNELS = ("fused", "foreach", "loop")


@dataclass
class SpeedOptions:
    precision: str = "fp32"
    compile: bool = False
    adam: str = "foreach"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise NoisecraftError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        if self.adam not in ADAM_KERNELS:
            raise NoisecraftError(f"unknown AdamW kernel {self.adam!r}; choose one of {', '.join(ADAM_KERNELS)}.")
        self._scaler = None

    # --- building ------------------------------------------------------------------------

    def optimizer(self, params, lr: float, weight_decay: float) -> torch.optim.AdamW:
        kernel = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[self.adam]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kernel)

    def wrap(self, model: torch.nn.Module, distributed) -> torch.nn.Module:
        """The module the loss calls: DistributedDataParallel across processes, then optionally compiled."""
        if self.precision == "fp16" and distributed.device.type != "cuda":
            raise NoisecraftError("fp16 training needs a GPU (float16 kernels on CPU are slow and unscaled); use "
                                  "--precision bf16 or fp32 on CPU.")
        if self.precision == "fp16":
            self.use_grad_scaler(distributed.device.type)
        net = model
        if distributed.active:
            from torch.nn.parallel import DistributedDataParallel
            ids = [distributed.device.index] if distributed.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        if self.compile:
            net = torch.compile(net)
        return net

    def use_grad_scaler(self, device_type: str, init_scale: float = 2.0 ** 16) -> None:
        """Scale the loss before backward and unscale before clipping and stepping (what fp16 needs)."""
        self._scaler = torch.amp.GradScaler(device_type, init_scale=init_scale)

    # --- one step --------------------------------------------------------------------------

    def autocast(self, device: torch.device):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    @staticmethod
    def no_sync(net: torch.nn.Module, skip: bool):
        """DDP: skip the gradient all-reduce for all but the last micro-batch of an accumulated step."""
        inner = getattr(net, "_orig_mod", net)      # a compiled module keeps the DDP wrapper here
        if skip and hasattr(inner, "no_sync"):
            return inner.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params, grad_clip: float) -> None:
        """Clip the global gradient norm (on unscaled gradients) and take the optimizer step."""
        params = [p for p in params if p.grad is not None]
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        if self._scaler is not None:
            self._scaler.step(optimizer)     # skipped when the gradients overflowed
            self._scaler.update()
        else:
            optimizer.step()
