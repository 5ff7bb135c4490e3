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
# # 4. One denoising step, and 5. sampling
#
# Train a small U-Net on the bundled digits, noise a test digit to $t = 40$, let the network predict
# $\hat\varepsilon$ and compute $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\hat\varepsilon)/\sqrt{\bar\alpha_t}$ — what
# `noisecraft viz denoise-step RUN --input IMAGE --t 40` draws — then sample with a few samplers.
# `NOISECRAFT_TINY=1` trains for a few seconds (the pictures are then mostly noise); unset it for ~1000 steps.
# The guide's chapters: `docs/tutorials/04-denoising-step.md`, `05-sampling.md`.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from noisecraft.commands.viz_tutorial import denoise_step
from noisecraft.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from noisecraft.data.datasets import load_dataset
from noisecraft.models.unet import UNetConfig
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.training.trainer import Trainer

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
data = load_dataset("digits", split="train")
run = Path(tempfile.mkdtemp()) / "run"
config = RunConfig(
    model=UNetConfig(in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                     dropout=0.0),
    diffusion=DiffusionConfig(schedule="cosine", prediction="eps", min_snr_gamma=5.0),
    train=TrainConfig(batch_size=32, lr=3e-3, warmup_steps=10 if TINY else 50, ema_decay=0.99,
                      steps=20 if TINY else 1000, sample_every=0, checkpoint_every=0, seed=0),
    data=DataConfig(dataset="digits", image_shape=tuple(data.image_shape), class_names=data.class_names),
)
print(Trainer(config, data, run, progress=False).fit())

# %%
pipe = DiffusionPipeline.from_run(run)
x0, _ = load_dataset("digits", split="test").batch(torch.arange(4))
r = denoise_step(pipe, x0, 40, seed=0)
print("mean squared error of eps_hat:", ((r["eps_hat"] - r["noise"]) ** 2).mean().item())
columns = {"x0": x0, "x_t": r["xt"], "eps": r["noise"] / 3, "eps_hat": r["eps_hat"] / 3, "x0_hat": r["x0_hat"]}
fig, axes = plt.subplots(4, 5, figsize=(7, 6))
for j, (name, images) in enumerate(columns.items()):
    for i in range(4):
        axes[i, j].imshow(images[i, 0].clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
        axes[i, j].axis("off")
    axes[0, j].set_title(name)
plt.show()

# %%
samplers = ["ddpm", "ddim", "dpmpp_2m", "heun"]
fig, axes = plt.subplots(len(samplers), 8, figsize=(8, len(samplers)))
for i, name in enumerate(samplers):
    images = pipe.sample(8, sampler=name, steps=10, seed=0).images
    for j in range(8):
        axes[i, j].imshow(images[j, 0], cmap="gray", vmin=-1, vmax=1)
        axes[i, j].axis("off")
    axes[i, 0].set_title(name, fontsize=8, loc="left")
plt.show()
