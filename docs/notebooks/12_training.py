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
# # 12. Training your own: a class-conditional model end to end
#
# The tutorials' example, in Python: a U-Net with a label embedding and a learned null class, trained on
# $L = \mathbb E\,\|\varepsilon - \varepsilon_\theta(x_t, t, \tilde c)\|^2$ with $\tilde c = \varnothing$ for 10% of the
# images, then sampled per class with classifier-free guidance. It is what
# `noisecraft train --dataset fashion-mnist --conditional` does. `NOISECRAFT_TINY=1` (CI) trains 80 steps on the
# bundled 16×16 digits (the samples are blobs: mechanics only); unset it for Fashion-MNIST (downloaded once) and
# 20 minutes. Chapter: `docs/tutorials/12-training.md`.

# %%
import csv
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from noisecraft.config import make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.training.trainer import Trainer

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
torch.set_num_threads(1 if TINY else torch.get_num_threads())
dataset = load_dataset("digits" if TINY else "fashion-mnist", split="train")
print(dataset.name, len(dataset), "images", tuple(dataset.image_shape), "classes:", dataset.class_names)

# the CLI's defaults for this dataset (make_run_config), made smaller at tiny settings
config = make_run_config(
    dataset, conditional=True,
    model={"base_channels": 16, "channel_mults": (1, 2)} if TINY else None,
    train={"steps": 80, "batch_size": 32, "warmup_steps": 20, "sample_every": 0, "checkpoint_every": 0,
           "log_every": 10} if TINY else {"minutes": 20})
print("model:", config.model.num_classes, "classes + null,", "label dropout", config.train.label_dropout)

# %%
run = Path(tempfile.mkdtemp(prefix="train-"))
summary = Trainer(config, dataset, run, progress=not TINY).fit()
print({k: summary[k] for k in ("steps", "loss", "seconds")})
print(sorted(p.name for p in run.iterdir()))     # config.json, model.safetensors (EMA), log.csv, state/ (resume)

# %%
with open(run / "log.csv") as f:
    log = list(csv.DictReader(f))
plt.figure(figsize=(4, 2.5))
plt.plot([int(r["step"]) for r in log], [float(r["loss"]) for r in log])
plt.xlabel("step")
plt.ylabel("L_simple")
plt.show()

# %% [markdown]
# One row per class, classifier-free guidance w = 3 (our w: 1 is no guidance).

# %%
pipe = DiffusionPipeline.from_run(run)
n = len(dataset.class_names)
fig, axes = plt.subplots(n, 6, figsize=(4, 0.75 * n))
for c in range(n):
    images = pipe.sample(6, label=c, guidance=3.0, sampler="ddim", steps=20, seed=c).images
    for j in range(6):
        axes[c, j].imshow(images[j, 0], cmap="gray", vmin=-1, vmax=1)
        axes[c, j].axis("off")
    axes[c, 0].set_title(dataset.class_names[c], fontsize=7, loc="left")
plt.show()
