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
# # 10. Hacking the sampler: loss guidance on x̂0 and the tutorials' latent steering
#
# Two ways to push a sample toward a loss $\ell(\hat x_0)$: the x̂0-shift mode (`guide_mode="x0"`) moves the
# denoised estimate down the gradient at every step; the tutorials' recipe (`guide_mode="latents"`) moves the
# latents themselves by $-k\,\sigma^2\nabla_x\ell(\hat x_0)$ every 5 steps, skipping step 0, with LMS. On Stable
# Diffusion with `blue_loss` (|blue − 0.9| on the decoded image) and k = 75 this is the tutorials' blue campfire;
# the digits are grey, so this notebook uses `brightness` (minus the sum of the pixels) on a tiny digits model —
# `NOISECRAFT_TINY=1` (CI) trains it for 80 steps, so it shows the mechanics only. Chapter: `docs/tutorials/10-hacking.md`.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import torch

from noisecraft.config import make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.guidance.objectives import brightness
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.training.trainer import Trainer

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
STEPS = 80 if TINY else 3000
torch.set_num_threads(1 if TINY else torch.get_num_threads())
dataset = load_dataset("digits", split="train")
config = make_run_config(dataset, conditional=False,    # the digits defaults, made smaller and faster
                         model=dict(base_channels=16, channel_mults=(1, 2), attention_levels=(1,)),
                         train=dict(batch_size=32, lr=3e-3, warmup_steps=20, ema_decay=0.99, steps=STEPS,
                                    sample_every=0, checkpoint_every=0, seed=0))
run = tempfile.mkdtemp(prefix="hack-")
Trainer(config, dataset, run, progress=False).fit()
pipe = DiffusionPipeline.from_run(run)

# %% [markdown]
# Same seeds, LMS at 10 steps: no guide, the x̂0-shift mode, and latent steering at three scales.

# %%
rows = {"no guide": pipe.sample(8, sampler="lms", steps=10, seed=0).images,
        "x0 shift, 0.05": pipe.sample(8, sampler="lms", steps=10, seed=0, guide=brightness, guide_scale=0.05).images}
for k in (0.1, 0.3, 1.0):
    rows[f"latents, k = {k:g}"] = pipe.sample(8, sampler="lms", steps=10, seed=0, guide=brightness,
                                              guide_mode="latents", guide_scale=k, guide_every=5).images
fig, axes = plt.subplots(len(rows), 8, figsize=(8, 1.1 * len(rows)))
for r, (name, images) in enumerate(rows.items()):
    for j in range(8):
        axes[r, j].imshow(images[j, 0], cmap="gray", vmin=-1, vmax=1)
        axes[r, j].axis("off")
    axes[r, 0].set_title(f"{name}: mean {images.mean():+.2f}", fontsize=8, loc="left")
plt.show()
