# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 11. The score view: Tweedie, annealed Langevin, predictor–corrector, the probability-flow ODE likelihood
#
# For $x = x_0 + \sigma\varepsilon$ the best denoiser is $D(x,\sigma) = \mathbb E[x_0\mid x] = x + \sigma^2\nabla_x\log p_\sigma(x)$
# (Tweedie), so an ε-prediction network is a score model: $\nabla_x\log p_\sigma(x) = -\hat\varepsilon/\sigma$.
# `NOISECRAFT_TINY=1` (CI) trains a tiny model on the 16×16 digits for 80 steps and integrates the ODE loosely;
# unset it for 3000 steps and tight tolerances. Chapter: `docs/tutorials/11-score.md`.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import torch

from noisecraft.config import make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.likelihood_ode import ode_bits_per_dim
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.samplers.langevin import score_and_denoised
from noisecraft.training.trainer import Trainer

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
STEPS = 80 if TINY else 3000
torch.set_num_threads(1 if TINY else torch.get_num_threads())
dataset = load_dataset("digits", split="train")
config = make_run_config(dataset, conditional=False,    # the digits defaults, made smaller and faster
                         model=dict(base_channels=16, channel_mults=(1, 2), attention_levels=(1,)),
                         train=dict(batch_size=32, lr=3e-3, warmup_steps=20, ema_decay=0.99, steps=STEPS,
                                    sample_every=0, checkpoint_every=0, seed=0))
run = tempfile.mkdtemp(prefix="score-")
Trainer(config, dataset, run, progress=False).fit()
pipe = DiffusionPipeline.from_run(run)

# %% [markdown]
# ## Tweedie's formula
# Noise a test digit to σ, take the score and the denoised estimate; check $D = x + \sigma^2 s$ and $s = -\hat\varepsilon/\sigma$.

# %%
x0, _ = load_dataset("digits", split="test").batch(torch.arange(1))
fig, axes = plt.subplots(2, 4, figsize=(6, 3.2))
for j, sigma in enumerate((0.2, 0.5, 1.0, 3.0)):
    x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(j))
    with torch.no_grad():
        score, denoised = score_and_denoised(pipe.denoiser, x, sigma)
    eps_hat = (x - denoised) / sigma
    assert torch.allclose(denoised, x + sigma**2 * score, atol=1e-4)
    assert torch.allclose(score, -eps_hat / sigma, atol=1e-4)
    axes[0, j].imshow(x[0, 0], cmap="gray")
    axes[0, j].set_title(f"x, σ = {sigma:g}", fontsize=8)
    axes[1, j].imshow(denoised[0, 0], cmap="gray", vmin=-1, vmax=1)
    axes[1, j].set_title("D(x, σ) = x + σ² s", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Annealed Langevin dynamics and predictor–corrector
# Langevin: $x \leftarrow x + \tfrac{\alpha_i}{2}\nabla_x\log p_{\sigma_i}(x) + \sqrt{\alpha_i}z$, a few updates per level;
# PC: a reverse-diffusion step, then a Langevin corrector step sized by a signal-to-noise ratio. Same seeds as DDPM.
# These samplers were designed for hundreds of levels: at 10 they keep visible noise.

# %%
levels = 10 if TINY else 200
rows = {name: pipe.sample(8, sampler=name, steps=levels, seed=0).images for name in ("ddpm", "langevin", "pc")}
fig, axes = plt.subplots(3, 8, figsize=(8, 3.3))
for r, (name, images) in enumerate(rows.items()):
    for j in range(8):
        axes[r, j].imshow(images[j, 0], cmap="gray", vmin=-1, vmax=1)
        axes[r, j].axis("off")
    axes[r, 0].set_title(f"{name}, {levels} levels", fontsize=8, loc="left")
plt.show()

# %% [markdown]
# ## The probability-flow ODE likelihood
# $\log p_0(x_0) = \log p_{\sigma_{\max}}(x_{\sigma_{\max}}) + \int \nabla\cdot\frac{x - D(x,\sigma)}{\sigma}\,d\sigma$,
# the divergence by Hutchinson probes, on dequantized 8-bit test digits, in bits per dimension.

# %%
test = load_dataset("digits", split="test")
images = test.images[: 4 if TINY else 64]
tolerance = 1e-3 if TINY else 1e-5
result = ode_bits_per_dim(pipe.denoiser, images, generator=torch.Generator().manual_seed(0), rtol=tolerance,
                          atol=tolerance)
print(f"{result['n']} test digits: {result['mean']:.2f} bits/dim (± {1.96 * result['stderr']:.2f}), "
      f"{result['nfe']:.0f} network evaluations per batch")
