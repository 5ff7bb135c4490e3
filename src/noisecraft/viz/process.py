"""Pictures of the diffusion process itself: the forward process of one image as a strip, and the reverse
process of a sampler run (x_t above x̂0 per saved step) as a strip and a GIF."""

from __future__ import annotations

from .images import save_gif, save_strip


def trajectory_frames(trajectory, limit=16):
    """x_t (shown on the data scale, x·sqrt(ᾱ); decoded, for latent runs) and x̂0 for each saved step, first
    `limit` images."""
    frames, denoised, captions = [], [], []
    total = trajectory[-1]["i"] + 1 if trajectory else 0
    for info in trajectory:
        frames.append(info["preview"][:limit].clamp(-1, 1))   # x_t as an image: see DiffusionPipeline
        denoised.append(info["denoised"][:limit].clamp(-1, 1))
        captions.append(f"step {info['i'] + 1}/{total}  sigma={info['sigma']:.2f}")
    return frames, denoised, captions


def reverse_pictures(trajectory, strip_path=None, gif_path=None, index: int = 0) -> list:
    """The reverse process of one sample as a two-row strip (x_t above x̂0, one column per saved step)
    and of the first samples as a GIF."""
    import torch

    frames, denoised, captions = trajectory_frames(trajectory)
    written = []
    if strip_path:
        rows = torch.stack([torch.stack([f[index] for f in frames]), torch.stack([d[index] for d in denoised])])
        columns = [c.split()[1] for c in captions]
        written.append(save_strip(rows, strip_path, rows=["x_t", "x0_hat"], captions=columns))
    if gif_path:
        written.append(save_gif(frames, gif_path, captions=captions))
    return written


def forward_strip(dataset, index, schedule, path, ts=(0, 50, 100, 200, 300, 500, 700, 999), seed=0):
    """The closed-form forward process q(x_t | x0) of one image at several t, as a captioned strip."""
    import torch

    x0, _ = dataset.batch(torch.tensor([index]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xs = torch.cat([schedule.q_sample(x0, torch.tensor([t]), noise) for t in ts])
    return save_strip(torch.cat([x0, xs.clamp(-1, 1)]), path, captions=["x0"] + [f"t={t}" for t in ts])
