"""The guide's pictures as `noisecraft viz` subcommands: the forward process of any image or latent
(`viz forward --input IMAGE [--latent RUN_OR_SD]`), the σ a sampler visits per step (`viz sigmas`), one denoising
step of a model (`viz denoise-step RUN --input IMAGE --t 40`), and a latent's channels from a train-vae run or an SD
model (`viz latents IMAGE --vae RUN_OR_SD`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NoisecraftError

MAX_SIDE = 256          # viz forward --input without --image-size: longer side scaled down to this


def load_autoencoder(path, device="cpu"):
    """(vae, scaling factor, image channels, image size (H, W), schedule or None) from a `train-vae` run, or from a
    latent model (a latent noisecraft run, a diffusers SD folder or an SD single file), whose schedule comes along."""
    from ..models.vae_loading import KIND, load_vae
    from ..pipelines.stable_diffusion import load_pipeline

    p = Path(path)
    if (p / "config.json").is_file():
        try:
            kind = json.loads((p / "config.json").read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind == KIND:
            vae, scale, config = load_vae(p, device=device)
            c, h, w = config["data"]["image_shape"]
            return vae, scale, c, (h, w), None
    pipe = load_pipeline(p, device=device)
    if pipe.vae is None:
        raise NoisecraftError(f"{path} is a pixel-space model with no autoencoder; pass a `noisecraft train-vae` run, "
                              "a latent run or a Stable Diffusion model.")
    return pipe.vae, pipe.scaling_factor, pipe.image_shape[0], tuple(pipe.image_shape[1:]), pipe.schedule


def _input_image(path, channels: int, size=None):
    """One image from a file as 1×C×H×W in [-1, 1]; at `size`, else its own size with the longer side ≤ MAX_SIDE."""
    import torch.nn.functional as F

    from ..io.images import load_images

    x = load_images(path, channels, size)[:1]
    h, w = x.shape[-2:]
    if size is None and max(h, w) > MAX_SIDE:
        k = MAX_SIDE / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * k)), max(1, round(w * k))), mode="bicubic", antialias=True,
                          align_corners=False).clamp(-1, 1)
    return x


def _square(size):
    return None if size is None else (size, size)


def _timesteps(args, T: int) -> list[int]:
    ts = args.t if args.t else [t for t in (0, 50, 100, 200, 300, 500, 700, 999) if t < T]
    bad = [t for t in ts if not 0 <= t < T]
    if bad:
        raise NoisecraftError(f"--t values must be timesteps in 0..{T - 1}, got {bad}.")
    return ts


def _channels_as_image(z, like):
    """Latent channels shown on the image grid: per-image min-max to [-1, 1], the first 3 (or 1) channels, upscaled
    with nearest neighbour to the image's size."""
    import torch.nn.functional as F

    c = like.shape[1]
    z = z[:, :c] if z.shape[1] >= c else z[:, :1].expand(-1, c, -1, -1)
    lo = z.amin(dim=(1, 2, 3), keepdim=True)
    hi = z.amax(dim=(1, 2, 3), keepdim=True)
    return F.interpolate((z - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1, size=like.shape[-2:], mode="nearest")


def viz_forward_input(args) -> int:
    """The closed-form forward process q(x_t | x0) of any image, or of its latent through an autoencoder."""
    import torch

    from ..schedule import NoiseSchedule
    from ..viz.images import save_strip

    out = args.out or "forward.png"
    generator = torch.Generator().manual_seed(args.seed)
    if args.latent is None:
        x0 = _input_image(args.input, 3, _square(args.image_size))
        schedule = NoiseSchedule.create(args.schedule or "cosine", args.T)
        ts = _timesteps(args, schedule.T)
        noise = torch.randn(x0.shape, generator=generator)
        xs = torch.cat([schedule.q_sample(x0, torch.tensor([t]), noise) for t in ts])
        path = save_strip(torch.cat([x0, xs.clamp(-1, 1)]), out, captions=["x0"] + [f"t={t}" for t in ts])
        print(f"wrote {path}")
        return 0
    vae, scale, channels, size, model_schedule = load_autoencoder(args.latent, args.device)
    x0 = _input_image(args.input, channels, _square(args.image_size) or size)
    schedule = (NoiseSchedule.create(args.schedule, args.T) if args.schedule
                else model_schedule or NoiseSchedule.create("cosine", args.T))
    ts = _timesteps(args, schedule.T)
    with torch.no_grad():
        z0 = vae.encode(x0.to(args.device)).mode().cpu() * scale
        noise = torch.randn(z0.shape, generator=generator)
        zs = torch.cat([schedule.q_sample(z0, torch.tensor([t]), noise) for t in ts])
        decoded = torch.cat([vae.decode(z.unsqueeze(0).to(args.device) / scale).cpu() for z in zs]).clamp(-1, 1)
    images = torch.cat([x0, decoded])
    latents = _channels_as_image(torch.cat([z0, zs]), images)
    path = save_strip(torch.stack([images, latents]).float(), out, captions=["x0"] + [f"t={t}" for t in ts],
                      rows=["decoded", "latent"])
    print(f"wrote {path} (z = {scale:g}·E(x0) of shape {tuple(z0.shape[1:])}, noised by q(z_t | z0), decoded)")
    return 0


def sampler_sigmas(sampler, steps, schedule, defaults, spacing=None, sigma_max=None):
    """(settings, σ sequence) a sampler visits: the schedule's σ_t at `steps` timesteps of the spacing, or Karras
    spacing (from sigma_max, default σ(T)) for a "... Karras" name; exactly what `samplers.generate` hands the
    sampler."""
    from ..samplers import karras_sigmas, resolve_sampler
    from ..samplers.steps import discrete_sigmas

    settings = defaults.resolve(sampler, steps, spacing=spacing)
    _, karras = resolve_sampler(settings["sampler"])
    if karras:
        sigmas = karras_sigmas(schedule.sigma_min, sigma_max or schedule.sigma_max, settings["steps"])
    else:
        sigmas = discrete_sigmas(schedule, settings["steps"], settings["spacing"], sigma_max)
    return settings, sigmas


def viz_sigmas(args) -> int:
    """The σ per sampling step of a sampler: Stable Diffusion's schedule by default, or a model's (--model)."""
    from ..pipelines.defaults import STABLE_DIFFUSION
    from ..schedule import NoiseSchedule
    from ..viz.tutorial import plot_sigmas

    if args.model:
        from ..pipelines.stable_diffusion import load_pipeline

        pipe = load_pipeline(args.model, device=args.device)
        schedule, defaults, what = pipe.schedule, pipe.defaults, str(args.model)
        sigma_max = pipe.denoiser.sigma_max
    else:
        schedule = NoiseSchedule.create(args.schedule or "scaled_linear", args.T)
        defaults, what, sigma_max = STABLE_DIFFUSION, f"{schedule.kind} schedule, T={schedule.T}", None
    settings, sigmas = sampler_sigmas(args.sampler, args.steps, schedule, defaults, args.spacing, sigma_max)
    label = f"{settings['sampler']}, {settings['steps']} steps, {settings['spacing']} spacing"
    path = plot_sigmas({label: sigmas}, args.out or "sigmas.png", title=what)
    print(f"{label} ({what}): {len(sigmas)} values, σ from {float(sigmas[0]):.4g} to {float(sigmas[-2]):.4g}, then 0")
    print(" ".join(f"{float(s):.4g}" for s in sigmas))
    print(f"wrote {path}")
    return 0


def denoise_step(pipe, x0, t: int, seed: int = 0, label=None, prompt=None):
    """Noise x0 (images in [-1, 1]) to timestep t and let the model predict the noise once.

    Returns a dict of z0 (the model's space), x_t = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t) ε (DDPM eq. 4), ε, the prediction
    ε̂ = (x − D(x, σ_t)) / σ_t on the σ scale x = x_t / sqrt(ᾱ_t), and x̂0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)."""
    import torch

    schedule = pipe.schedule
    if not 0 <= t < schedule.T:
        raise NoisecraftError(f"--t must be a timestep in 0..{schedule.T - 1}, got {t}.")
    cond = None
    if pipe.takes_prompts:
        cond = pipe.embed([prompt or ""])
    elif pipe.num_classes:
        cond = torch.tensor([pipe.num_classes if label is None else int(label)], device=pipe.device)
    with torch.no_grad():
        z0 = pipe.encode(x0.to(pipe.device)).float()
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device)
        xt = schedule.q_sample(z0, torch.tensor([t], device=z0.device), noise)
        ab = float(schedule.alphas_cumprod[t])
        sigma = float(schedule.sigmas[t])
        x = xt / ab ** 0.5
        x0_hat = pipe.denoiser(x, torch.full((1,), sigma, device=z0.device), cond)
        eps_hat = (x - x0_hat) / sigma
    return {"z0": z0, "xt": xt, "noise": noise, "eps_hat": eps_hat, "x0_hat": x0_hat, "sigma": sigma,
            "alpha_bar": ab}


def viz_denoise_step(args) -> int:
    """x_t, ε, ε̂ and x̂0 of one network evaluation at timestep --t (default 40)."""
    import torch

    from ..pipelines.stable_diffusion import load_pipeline
    from ..viz.tutorial import denoise_step_figure

    if not args.run:
        raise NoisecraftError("viz denoise-step needs a model: noisecraft viz denoise-step RUN --input IMAGE --t 40.")
    if not args.input:
        raise NoisecraftError("viz denoise-step needs an image: add --input IMAGE (a PNG, JPEG or .npz).")
    t = args.t[0] if args.t else 40
    pipe = load_pipeline(args.run, device=args.device)
    c, h, w = pipe.image_shape
    x0 = _input_image(args.input, c, _square(args.image_size) or (h, w))
    r = denoise_step(pipe, x0, t, seed=args.seed, label=args.label, prompt=args.prompt)
    mse = float(((r["eps_hat"] - r["noise"]) ** 2).mean())
    if pipe.vae is None:
        cells = (x0, r["xt"], r["noise"], r["eps_hat"], r["x0_hat"])
    else:
        with torch.no_grad():
            xt_img, x0_hat_img = pipe.decode(r["xt"]).clamp(-1, 1), pipe.decode(r["x0_hat"]).clamp(-1, 1)
        cells = (x0, xt_img.cpu(), _channels_as_image(r["noise"].cpu(), x0) * 3,
                 _channels_as_image(r["eps_hat"].cpu(), x0) * 3, x0_hat_img.cpu())
    path = denoise_step_figure(*[cell.cpu() for cell in cells], args.out or "denoise_step.png", t=t)
    print(f"t={t}: sigma={r['sigma']:.4g}, alpha_bar={r['alpha_bar']:.4g}, mean squared error of eps_hat {mse:.4f} "
          f"(1.0 would be a network that predicts nothing)")
    print(f"wrote {path}")
    return 0


def viz_latents(args) -> int:
    """`viz latents IMAGE --vae RUN_OR_SD`: the channels of an image's latent, from a train-vae run or any latent
    model (a latent run, an SD diffusers folder or single file)."""
    from ..io.images import load_images
    from .vae import latent_figure

    image = args.input or args.run
    if not image:
        raise NoisecraftError("viz latents needs an image: noisecraft viz latents IMAGE --vae RUN --out latents.png.")
    if not args.vae:
        raise NoisecraftError("viz latents needs the autoencoder: add --vae RUN (a train-vae run, a latent run or an "
                              "SD model).")
    vae, _, c, size, _ = load_autoencoder(args.vae, args.device)
    images = load_images(image, c, _square(args.image_size) or size)[:8]
    path = latent_figure(vae, images, args.out or "latents.png")
    print(f"wrote {path}")
    return 0
