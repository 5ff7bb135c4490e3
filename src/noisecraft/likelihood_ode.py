"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", §4.3 and appendix D.2).

The probability-flow ODE moves samples deterministically with the same marginals p_σ as the diffusion. On the σ
scale of the samplers (x = x0 + σ·ε, a `Denoiser` D(x, σ) ≈ E[x0 | x]) it reads (Karras et al. 2022, EDM,
eq. 1 with σ(t) = t)

    dx/dσ = f(x, σ) = (x − D(x, σ)) / σ.

We integrate in s = log σ, where the drift is dx/ds = σ·f = x − D(x, σ): the same ODE, evenly scaled over the
four decades from σ_min to σ_max, so an adaptive solver needs far fewer steps. Along a trajectory the
log-density changes by the instantaneous change of variables (Chen et al. 2018; FFJORD, Grathwohl et al. 2019)

    d log p(x(s)) / ds = −∇·(x − D(x, σ)),

so, integrating from y = x(σ_min) up to σ_max,

    log p(y) = log p_prior(x(σ_max)) + ∫ ∇·(x − D(x, σ)) ds.

The divergence is dim − tr(∂D/∂x); the trace is the Hutchinson–Skilling estimate εᵀ(∂D/∂x)ε with one
vector-Jacobian product per probe ε (Rademacher or Gaussian, drawn once and held fixed over the whole solve, as
in score_sde), or, for small inputs, the exact trace (one vector-Jacobian product per dimension). The images and
the accumulated divergences of the whole batch form one ODE system for scipy's adaptive Runge–Kutta solver
(shared step sizes, as in score_sde).

Approximations (relative to the diffusion's own density of the data):
- Prior: x(σ_max) is scored under N(0, (1 + σ_max²) I), the DDPM prior N(0, I) of x_T = x/sqrt(1 + σ²) carried
  to the σ scale. The true marginal is the data convolved with N(0, σ_max² I); the log-densities differ by
  about |data mean|/σ_max nats per image plus O(dim/σ_max²) (σ_max ≈ 157 for the linear schedule with T = 1000,
  2·10⁴ for the cosine one).
- Start: the solve starts at σ_min > 0, not at 0, so it scores y under the data smoothed by N(0, σ_min² I)
  (σ_min is the schedule's smallest σ by default, 0.01 for the linear schedule). This tiny last bit of noise
  is ignored, not corrected by a Gaussian term.
Neither makes the number less honest: the prior pushed through the ODE is a continuous normalizing flow, a
proper density, and logp is its exact log-density of y up to the solver and Hutchinson errors.

Bits/dim: y = 2(x + u)/256 − 1 with u ~ U[0, 1)^D is uniform dequantization of the 8-bit levels x (Theis et al.
2016; Ho et al. 2020, §4); −log p(x + u) = −log p(y) − D·log(2/256) is a bound on the discrete NLL in
expectation over u, and bits/dim = −log p(x + u) / (D·ln 2): a uniform density on [0, 256)^D gives exactly 8.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .errors import NoisecraftError

NOISE_TYPES = ("rademacher", "gaussian", "exact")
METHODS = ("RK45", "RK23", "DOP853")      # explicit solvers: the implicit ones would need the full Jacobian
LEVELS = 256


# --- dequantization and units --------------------------------------------------------------------------


def _levels(images) -> torch.Tensor:
    """The integer levels 0..255 of uint8 images, or of floats in [-1, 1] placed at v/127.5 − 1."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        raise NoisecraftError("dequantize takes a batch of images (a uint8 or float tensor or numpy array of shape "
                              "N×C×H×W); add a batch dimension.")
    if images.dtype == torch.uint8:
        return images.long()
    if not images.is_floating_point():
        raise NoisecraftError(f"dequantize takes uint8 images or floats in [-1, 1], got dtype {images.dtype}; "
                              "convert the images to uint8.")
    levels = (images.double() + 1) * 127.5
    rounded = levels.round()
    if not bool(torch.isfinite(levels).all()) or (levels - rounded).abs().max() > 1e-3 \
            or rounded.min() < 0 or rounded.max() > LEVELS - 1:
        raise NoisecraftError("dequantize takes floats on the 256 levels v/127.5 - 1 of 8-bit images; "
                              "pass the uint8 images instead.")
    return rounded.long()


def dequantize(images, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization: y = 2(x + u)/256 − 1 with u ~ U[0, 1) per dimension, as float32 in [-1, 1).

    x are the 8-bit levels 0..255: uint8 images, or floats in [-1, 1] already mapped by x/127.5 − 1 (their levels
    are recovered by rounding). Level v lands in the bin [2v/256 − 1, 2(v + 1)/256 − 1).
    """
    levels = _levels(images)
    device = generator.device if generator is not None else levels.device
    u = torch.rand(levels.shape, generator=generator, dtype=torch.float64, device=device).to(levels.device)
    y = 2 * (levels + u) / LEVELS - 1
    # values within 2⁻²⁵ of 1 round up to 1.0 in float32; keep the half-open interval [-1, 1).
    return y.float().clamp(max=1 - 2.0**-23)


def bits_per_dim_from_log_likelihood(logp_y: torch.Tensor, num_dims: int) -> torch.Tensor:
    """bits/dim = −log p(x + u) / (D·ln 2) with log p(x + u) = log p(y) + D·log(2/256) for y = 2(x + u)/256 − 1.

    logp_y is the continuous log-density of y in nats (per image); the Jacobian term moves it to the 8-bit scale
    [0, 256)^D, where a uniform density gives exactly 8 bits/dim.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise NoisecraftError(f"num_dims must be a positive integer (C·H·W), got {num_dims!r}.")
    logp_y = torch.as_tensor(logp_y, dtype=torch.float64)
    logp_x = logp_y + num_dims * math.log(2 / LEVELS)
    return -logp_x / (num_dims * math.log(2))


# --- the ODE ------------------------------------------------------------------------------------------


def _float_option(name: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
        raise NoisecraftError(f"{name} must be a finite number > {low:g}, got {value!r}.")
    return float(value)


def _sigma_range(denoiser, sigma_min, sigma_max) -> tuple[float, float]:
    """(σ_min, σ_max): the given values, else the schedule's smallest and largest σ (the whole process, whose end
    is the prior; not the lower top that sampling grids may start from), else the denoiser's."""
    if sigma_min is None or sigma_max is None:
        if not (hasattr(denoiser, "sigma_min") and hasattr(denoiser, "sigma_max")):
            raise NoisecraftError("this denoiser has no sigma_min/sigma_max; pass sigma_min and sigma_max.")
    if sigma_max is None:
        schedule = getattr(denoiser, "schedule", None)
        sigma_max = float(schedule.sigma_max) if hasattr(schedule, "sigma_max") else float(denoiser.sigma_max)
    lo = _float_option("sigma_min", float(denoiser.sigma_min) if sigma_min is None else sigma_min)
    hi = _float_option("sigma_max", sigma_max)
    if not lo < hi:
        raise NoisecraftError(f"the ODE needs sigma_min < sigma_max, got {lo} and {hi}.")
    return lo, hi


def _compute_placement(denoiser, y: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    """The network's float dtype and device (a float64 CPU y still feeds a float32 GPU model), else y's."""
    if isinstance(denoiser, nn.Module):
        for p in denoiser.parameters():
            if p.is_floating_point():
                return p.dtype, p.device
    return y.dtype, y.device


def _draw_probes(shape, count: int, noise: str, generator, dtype, device) -> torch.Tensor | None:
    """`count` probe vectors per image (count × N × ...), fixed for the whole solve; None for the exact trace."""
    if noise == "exact":
        return None
    at = generator.device if generator is not None else device
    full = (count, *shape)
    if noise == "gaussian":
        eps = torch.randn(full, generator=generator, dtype=torch.float64, device=at)
    else:
        eps = torch.randint(0, 2, full, generator=generator, device=at).double() * 2 - 1
    return eps.to(device=device, dtype=dtype)


def _trace_jacobian(out: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """tr(∂out/∂x) per image: mean of εᵀ(∂out/∂x)ε over the probes (Hutchinson–Skilling), or the exact trace."""
    n = x.shape[0]
    if probes is None:
        flat = out.reshape(n, -1)
        dims = flat.shape[1]
        trace = torch.zeros(n, dtype=out.dtype, device=out.device)
        for i in range(dims):       # images are independent, so one backward pass gives ∂out_i/∂x_i for all
            grad, = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < dims - 1)
            trace = trace + grad.reshape(n, -1)[:, i]
        return trace
    total = torch.zeros(n, dtype=out.dtype, device=out.device)
    for k, eps in enumerate(probes):
        vjp, = torch.autograd.grad(out, x, grad_outputs=eps, retain_graph=k < len(probes) - 1)
        total = total + (vjp * eps).reshape(n, -1).sum(1)
    return total / len(probes)


def _check_inputs(y, cond, rtol, atol, probes, noise, method):
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.ndim < 2 or y.shape[0] < 1 or y[0].numel() < 1:
        raise NoisecraftError("ode_log_likelihood takes a float tensor of shape N×C×H×W (or N×D) with N >= 1; "
                              "dequantize uint8 images first.")
    if not bool(torch.isfinite(y).all()):
        raise NoisecraftError("the images given to ode_log_likelihood contain NaN or infinity; check the data.")
    if isinstance(cond, torch.Tensor) and (cond.ndim == 0 or cond.shape[0] != y.shape[0]):
        raise NoisecraftError(f"cond must have one entry per image ({y.shape[0]}), got shape {tuple(cond.shape)}.")
    for name, value in (("rtol", rtol), ("atol", atol)):
        _float_option(name, value)
        if value >= 1:
            raise NoisecraftError(f"{name} must be below 1 (try 1e-5), got {value!r}.")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise NoisecraftError(f"probes must be a positive integer, got {probes!r}.")
    if noise not in NOISE_TYPES:
        raise NoisecraftError(f"unknown divergence noise {noise!r}; choose one of {', '.join(NOISE_TYPES)}.")
    if method not in METHODS:
        raise NoisecraftError(f"unknown ODE method {method!r}; choose one of {', '.join(METHODS)}.")


def ode_log_likelihood(denoiser, y: torch.Tensor, *, cond=None, sigma_min: float | None = None,
                       sigma_max: float | None = None, rtol: float = 1e-5, atol: float = 1e-5, probes: int = 1,
                       noise: str = "rademacher", generator: torch.Generator | None = None,
                       method: str = "RK45") -> dict:
    """log p(y) in nats per image by the probability-flow ODE (score SDE §4.3, appendix D.2; see the module doc).

    y: float images N×C×H×W on the [-1, 1] scale (dequantized), treated as x(σ_min). The batch is one ODE system
    solved by `scipy.integrate.solve_ivp(method=...)` in s = log σ from log σ_min to log σ_max.
    noise: "rademacher" or "gaussian" Hutchinson probes (`probes` of them per image, averaged), or "exact" (one
    backward pass per dimension: for small inputs and tests). A denoiser in training mode is switched to eval
    mode for the solve (dropout would make the ODE random) and switched back.

    Returns {"logp", "prior_logp", "delta_logp"} (float64 tensors of shape N, logp = prior_logp + delta_logp),
    "nfe" (denoiser evaluations by the solver) and the "sigma_min", "sigma_max" used.
    """
    from scipy.integrate import solve_ivp

    _check_inputs(y, cond, rtol, atol, probes, noise, method)
    lo, hi = _sigma_range(denoiser, sigma_min, sigma_max)
    (dtype, device), shape = _compute_placement(denoiser, y), tuple(y.shape)
    if isinstance(cond, torch.Tensor):
        cond = cond.to(device)
    n, numel = shape[0], y.numel()
    eps = _draw_probes(shape, probes, noise, generator, dtype, device)

    def drift_and_divergence(s: float, z: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(z[:numel]).reshape(shape).to(device=device, dtype=dtype)
        sigma = torch.full((n,), math.exp(s), dtype=torch.float64, device=device)
        with torch.enable_grad():
            x.requires_grad_(True)
            denoised = denoiser(x, sigma, cond)
            # ∇·(x − D) = dim − tr(∂D/∂x): only D's part is estimated, which spares Gaussian probes the
            # variance of the identity (Rademacher probes estimate the identity exactly either way).
            div = numel // n - _trace_jacobian(denoised, x, eps)
        drift = x.detach() - denoised.detach()                      # dx/d log σ = σ · (x − D)/σ
        drift, div = drift.double().cpu(), div.detach().double().cpu()
        if not (bool(torch.isfinite(drift).all()) and bool(torch.isfinite(div).all())):
            raise NoisecraftError(f"the denoiser returned NaN or infinity at sigma={math.exp(s):.4g}; "
                                  "check the model weights and the input range.")
        return np.concatenate([drift.numpy().ravel(), div.numpy()])

    z0 = np.concatenate([y.detach().double().cpu().numpy().ravel(), np.zeros(n)])
    modes = [(m, m.training) for m in denoiser.modules()] if isinstance(denoiser, nn.Module) else []
    if modes:
        denoiser.eval()
    try:
        # t_eval keeps only the end point (the default keeps every step: N·D floats each).
        sol = solve_ivp(drift_and_divergence, (math.log(lo), math.log(hi)), z0, method=method, rtol=rtol, atol=atol,
                        t_eval=[math.log(hi)])
    finally:
        for module, training in modes:
            module.training = training
    if sol.status != 0:
        raise NoisecraftError(f"the ODE solver stopped early ({sol.message}); loosen rtol/atol or check the model.")

    end = torch.from_numpy(sol.y[:, -1])
    x_end, delta = end[:numel].reshape(n, -1), end[numel:]
    # Prior N(0, (1 + σ_max²) I): DDPM's N(0, I) for x_T = x / sqrt(1 + σ²), on the σ scale.
    var = 1.0 + hi**2
    dims = x_end.shape[1]
    prior = -0.5 * dims * math.log(2 * math.pi * var) - x_end.square().sum(1) / (2 * var)
    back = y.device
    return {"logp": (prior + delta).to(back), "prior_logp": prior.to(back), "delta_logp": delta.to(back),
            "nfe": int(sol.nfev), "sigma_min": lo, "sigma_max": hi}


def _as_images(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.shape[0] < 1:
        raise NoisecraftError("ode_bits_per_dim takes a batch of 8-bit images (a uint8 tensor or numpy array of "
                              "shape N×C×H×W); add a batch dimension.")
    return images


def ode_bits_per_dim(denoiser, images_uint8, *, cond=None, batch_size: int = 64, repeats: int = 1,
                     generator: torch.Generator | None = None, progress=None, **ode_options) -> dict:
    """Bits/dim of 8-bit images under the probability-flow ODE: dequantize, `ode_log_likelihood`, convert.

    Each image's bits/dim is averaged over `repeats` independent draws of the dequantization noise u and the
    Hutchinson probes. cond: one label (or condition row) per image, or None. progress(k), if given, is called
    with the number of images finished after each batch (N·repeats in all); ode_options go to
    `ode_log_likelihood` (sigma_min, sigma_max, rtol, atol, probes, noise, method).

    Returns {"bpd": per-image float64 tensor, "mean", "stderr" (standard error of the mean over images: it covers
    the spread between images and the estimator noise; NaN for one image), "ci95": mean ± 1.96·stderr,
    "nfe": mean solver evaluations per batch, "n": number of images}.
    """
    images = _as_images(images_uint8)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NoisecraftError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise NoisecraftError(f"repeats must be a positive integer, got {repeats!r}.")
    n, dims = images.shape[0], images[0].numel()
    if isinstance(cond, (torch.Tensor, np.ndarray)) and (cond.ndim == 0 or cond.shape[0] != n):
        raise NoisecraftError(f"cond must have one entry per image ({n}), got shape {tuple(cond.shape)}.")
    total = torch.zeros(n, dtype=torch.float64)
    nfes = []
    for _ in range(repeats):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            y = dequantize(images[start:stop], generator)
            batch_cond = cond[start:stop] if cond is not None else None
            out = ode_log_likelihood(denoiser, y, cond=batch_cond, generator=generator, **ode_options)
            total[start:stop] += bits_per_dim_from_log_likelihood(out["logp"].cpu(), dims)
            nfes.append(out["nfe"])
            if progress is not None:
                progress(stop - start)
    bpd = total / repeats
    mean = float(bpd.mean())
    stderr = float(bpd.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return {"bpd": bpd, "mean": mean, "stderr": stderr, "ci95": (mean - 1.96 * stderr, mean + 1.96 * stderr),
            "nfe": float(np.mean(nfes)), "n": n}
