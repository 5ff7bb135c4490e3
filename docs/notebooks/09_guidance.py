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
# # 9. Guidance: class labels, classifier-free guidance, negative labels
#
# A class-conditional U-Net trained with 10–20% of its labels replaced by the null class is two models in one:
# $\varepsilon_\theta(x_t, t, c)$ and $\varepsilon_\theta(x_t, t, \varnothing)$. Classifier-free guidance combines them:
#
# $$\tilde\varepsilon = \varepsilon_\theta(x_t, t, \varnothing) + w\,\big(\varepsilon_\theta(x_t, t, c) - \varepsilon_\theta(x_t, t, \varnothing)\big)$$
#
# **Our $w$ is the paper's $w + 1$** (Ho & Salimans write $(1 + w')\varepsilon_c - w'\varepsilon_\varnothing$): $w = 1$ is the
# plain conditional model, $w = 0$ the unconditional one, SD's default 7.5 is the paper's 6.5.
# `NOISECRAFT_TINY=1` (CI) trains a tiny model on the 16×16 digits for 80 steps: the samples are blobs and show
# only the mechanics; unset it for 3000 steps, where the labels become legible. Chapter: `docs/tutorials/09-guidance.md`.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import torch

from noisecraft.config import make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.guidance.classifier_free import ClassifierFreeGuidance
from noisecraft.pipelines.diffusion import DiffusionPipeline
from noisecraft.training.trainer import Trainer

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
STEPS = 80 if TINY else 3000
torch.set_num_threads(1 if TINY else torch.get_num_threads())
dataset = load_dataset("digits", split="train")
config = make_run_config(dataset, conditional=True,    # + a label embedding and the null class
                         model=dict(base_channels=16, channel_mults=(1, 2), attention_levels=(1,)),
                         train=dict(batch_size=32, lr=3e-3, warmup_steps=20, ema_decay=0.99, steps=STEPS,
                                    label_dropout=0.2, sample_every=0, checkpoint_every=0, seed=0))
run = tempfile.mkdtemp(prefix="cond-")
Trainer(config, dataset, run, progress=False).fit()
pipe = DiffusionPipeline.from_run(run)
print("classes:", pipe.num_classes, "| the null label is", pipe.num_classes)

# %% [markdown]
# The guided denoiser is a wrapper: one batched forward pass for the conditional and the unconditional half.
# Check it against the formula by hand, at one noise level.

# %%
x = torch.randn(4, *pipe.model_shape, generator=torch.Generator().manual_seed(0)) * 3.0
sigma, w = torch.tensor(3.0), 4.0
labels, null = torch.tensor([0, 1, 2, 3]), torch.full((4,), pipe.num_classes)
with torch.no_grad():
    guided = ClassifierFreeGuidance(pipe.denoiser, w, torch.tensor(pipe.num_classes))(x, sigma, labels)
    by_hand = pipe.denoiser(x, sigma, null) + w * (pipe.denoiser(x, sigma, labels) - pipe.denoiser(x, sigma, null))
print("wrapper == formula:", torch.allclose(guided, by_hand, atol=1e-5))

# %% [markdown]
# Same seeds, labels 0..7, guidance w = 0 (unconditional), 1 (conditional, no guidance), 2 and 4.

# %%
rows = {w: pipe.sample(8, sampler="ddim", steps=20, seed=0, label=torch.arange(8), guidance=w).images
        for w in (0.0, 1.0, 2.0, 4.0)}
fig, axes = plt.subplots(4, 8, figsize=(8, 4.4))
for r, (w, images) in enumerate(rows.items()):
    for j in range(8):
        axes[r, j].imshow(images[j, 0], cmap="gray", vmin=-1, vmax=1)
        axes[r, j].axis("off")
    axes[r, 0].set_title(f"w = {w:g}", fontsize=8, loc="left")
plt.show()

# %% [markdown]
# A negative label takes the place of $\varnothing$: $\tilde\varepsilon = \varepsilon(c_-) + w(\varepsilon(c) - \varepsilon(c_-))$
# pushes away from $c_-$. With no positive label the condition is the null class: "anything but $c_-$".

# %%
away = pipe.sample(8, sampler="ddim", steps=20, seed=0, negative_label=0, guidance=3.0).images
toward = pipe.sample(8, sampler="ddim", steps=20, seed=0, label=3, negative_label=8, guidance=3.0).images
fig, axes = plt.subplots(2, 8, figsize=(8, 2.3))
for r, (name, images) in enumerate((("not a 0", away), ("a 3, not an 8", toward))):
    for j in range(8):
        axes[r, j].imshow(images[j, 0], cmap="gray", vmin=-1, vmax=1)
        axes[r, j].axis("off")
    axes[r, 0].set_title(name, fontsize=8, loc="left")
plt.show()
