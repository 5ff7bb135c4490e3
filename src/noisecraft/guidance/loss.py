"""Loss guidance: steer a denoiser by the gradient of any differentiable loss on the predicted x̂0.

Each wrapper in guidance/ takes a denoiser D(x, σ, cond) -> x̂0 and returns another one, so it works with every
sampler (they only ever call D) and with any model behind D, pixel or latent. Wrappers stack:

    D = ClassifierFreeGuidance(base, 3.0, null)          # guidance/classifier_free.py
    D = LossGuidance(D, brightness, scale=0.1)            # this module: push towards low loss
    D = InpaintingDenoiser(D, known, mask)                # guidance/inpainting.py: outermost, so the known
                                                          # region stays exact

On the σ scale (x = x0 + σ·ε) the score and the denoiser are tied by Tweedie's formula,
∇_x log p_σ(x) = (D(x, σ) - x) / σ², so a change of the score by Δ is a change of x̂0 by σ²·Δ.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..denoiser import DenoiserWrapper, sigma_like
from ..errors import NoisecraftError

# --------------------------------------------------------------------------------------------------
# loss guidance

GUIDANCE_MODES = ("score", "x0")


class LossGuidance(DenoiserWrapper):
    """Steer sampling towards low values of any differentiable loss ℓ(x̂0) of the predicted clean image.

    Both modes shift the denoiser's answer, so every sampler follows the guided x̂0:

    mode="score": the forward guidance of Bansal et al. 2023, "Universal Guidance for Diffusion Models"
    (eq. 6, ε̂' = ε̂ + s·sqrt(1 - ᾱ_t)·∇_{x_t} ℓ(x̂0(x_t))), which on the σ scale reads

        D'(x, σ) = D(x, σ) - s·σ²·∇_x ℓ(D(x, σ)),   i.e.   ∇_x log p'_σ = ∇_x log p_σ - s·∇_x ℓ(x̂0(x)):

    the score of p(x)·exp(-s·ℓ(x̂0(x))), the same form as classifier guidance (Dhariwal & Nichol 2021)
    with -ℓ in place of log p(y | x). The gradient flows back through the network (a backward pass per
    guided call). By Tweedie's second-order formula σ²·∂D/∂x = Cov[x0 | x], so the shift is Cov[x0|x]·∇ℓ:
    it moves x̂0 along directions the data actually varies in, but at very high σ it is the difference
    of two numbers near σ² and the network's small Jacobian errors get multiplied by σ² (cosine schedule:
    σ_max ≈ 2·10⁴). `max_sigma` turns guidance off above a noise level; a few units works well.

    mode="x0" (default): the same with Cov[x0 | x] replaced by the identity,

        D'(x, σ) = D(x, σ) - s·∇_{x̂0} ℓ(x̂0),   x̂0 = D(x, σ),

    no backward pass through the network, bounded at every σ, and `scale` is a plain step size on x̂0
    (in pixel units for a loss summed over pixels, whatever the image size). Robust and cheap, so it
    is the default; the network still reacts to the shifted x at the next step.

    loss_fn(x̂0) returns one loss per sample (shape N) or a scalar; losses are summed, so the gradient
    of sample i depends on sample i only when loss_fn is per sample (same seed, same picture, whatever the
    batch size). Guidance applies on every `every`-th call of the denoiser (1: all; a second-order
    sampler calls it twice per step), counted from the first call or the last `reset()`. The gradient is
    taken under `torch.enable_grad()`, so it works inside the samplers' `torch.no_grad()`, and
    `torch.autograd.grad` leaves the model's .grad untouched; the result is detached.
    """

    def __init__(self, denoiser: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], scale: float,
                 every: int = 1, mode: str = "x0", max_sigma: float = float("inf")):
        super().__init__(denoiser)
        if not callable(loss_fn):
            raise NoisecraftError(f"loss guidance needs a callable loss_fn(x0) -> loss, got {loss_fn!r}.")
        if not isinstance(every, int) or every < 1:
            raise NoisecraftError(f"guidance 'every' must be an integer >= 1, got {every!r}.")
        if mode not in GUIDANCE_MODES:
            raise NoisecraftError(f"unknown loss guidance mode {mode!r}; choose one of {', '.join(GUIDANCE_MODES)}.")
        self.loss_fn, self.scale, self.every, self.mode, self.max_sigma = loss_fn, float(scale), every, mode, max_sigma
        self.calls = 0

    def reset(self) -> None:
        """Start counting calls again (for `every` > 1), e.g. before the next batch."""
        self.calls = 0

    def _loss(self, x0: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(x0)
        if not torch.is_tensor(loss) or loss.ndim > 1 or (loss.ndim == 1 and loss.numel() != x0.shape[0]):
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise NoisecraftError(f"a guidance loss must return a scalar or one value per sample (shape "
                                  f"({x0.shape[0]},)), got {shape}; reduce it over pixels and channels.")
        return loss.sum()

    def forward(self, x, sigma, cond=None):
        apply = self.scale != 0 and self.calls % self.every == 0
        self.calls += 1
        sigma_b = sigma_like(sigma, x)
        if not apply or bool((sigma_b > self.max_sigma).all()):
            return self.inner(x, sigma, cond)
        with torch.enable_grad():
            if self.mode == "score":
                x_in = x.detach().requires_grad_(True)
                x0 = self.inner(x_in, sigma, cond)
                (grad,) = torch.autograd.grad(self._loss(x0), x_in)
                step = sigma_b**2 * grad                        # σ²·∇_x ℓ(x̂0(x))
            else:
                x0 = self.inner(x, sigma, cond).detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self._loss(x0), x0)
                step = grad                                     # ∇_{x̂0} ℓ(x̂0)
        step = torch.where(sigma_b > self.max_sigma, torch.zeros_like(step), step)
        return (x0 - self.scale * step).detach()


__all__ = ["GUIDANCE_MODES", "LatentSteering", "LossGuidance"]


class LatentSteering:
    """The loss guidance of the Stable Diffusion tutorials ("Stable Diffusion Deep Dive", fast.ai 2022), literally:
    every `every` steps except step 0, the sampler's latents are moved

        x <- x - k·σ²·∇_x ℓ(x̂0),   x̂0 = x - σ·ε̂  with ε̂ held fixed, so that ∇_x ℓ = ∇_{x̂0} ℓ,

    and the sampler then takes its step with the slope ε̂ it computed from the latents *before* the move (the
    tutorial calls scheduler.step(noise_pred, t, latents) with the old noise_pred and the moved latents).
    Unlike `LossGuidance`, this changes x between the sampler's steps, not the denoiser's answer, so it is a
    sampler option (`steer=`), taken by the samplers that integrate a slope: euler, heun, lms. ℓ is applied per
    image and summed, as a batch of one in the tutorial; k is `scale` (the tutorial: 75 for blue_loss)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], scale: float = 75.0, every: int = 5,
                 skip_first: bool = True):
        if not callable(loss_fn):
            raise NoisecraftError("latent steering needs a loss function loss(x0) -> one value per sample.")
        if not isinstance(every, int) or every < 1:
            raise NoisecraftError(f"latent steering every must be a positive integer, got {every!r}.")
        self.loss_fn, self.scale, self.every, self.skip_first = loss_fn, float(scale), every, skip_first

    def __call__(self, x: torch.Tensor, sigma: float, denoised: torch.Tensor, i: int) -> torch.Tensor:
        """The latents after step i's move (x itself on the steps that are not steered)."""
        if i % self.every or (self.skip_first and i == 0):
            return x
        with torch.enable_grad():
            x0 = denoised.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.loss_fn(x0).sum(), x0)
        return x - self.scale * float(sigma) ** 2 * grad.to(x.dtype)
