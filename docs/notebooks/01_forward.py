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
# # 1. The forward process
#
# $q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, (1-\bar\alpha_t) I)$, implemented by
# `NoiseSchedule.q_sample`. The guide's chapter: `docs/tutorials/01-forward.md`.

# %%
import matplotlib.pyplot as plt
import torch

from noisecraft.data.datasets import load_dataset
from noisecraft.schedule import NoiseSchedule

digits = load_dataset("digits", split="train")
x0, _ = digits.batch(torch.tensor([0]))
schedule = NoiseSchedule.create("cosine", 1000)

# %% [markdown]
# One step at a time, $q(x_t \mid x_{t-1})$, agrees in distribution with the closed form: after $t$ steps the
# variance of the noise is $1 - \bar\alpha_t$.

# %%
g = torch.Generator().manual_seed(0)
x = x0.repeat(512, 1, 1, 1)
for t in range(200):
    x = schedule.q_step(x, torch.tensor([t]), torch.randn(x.shape, generator=g))
residual = x - schedule.sqrt_alphas_cumprod[199].float() * x0
print(f"variance after 200 steps: {residual.var().item():.4f}, 1 - alpha_bar_199 = {1 - schedule.alphas_cumprod[199].item():.4f}")

# %%
ts = [0, 50, 100, 200, 300, 500, 700, 999]
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
fig, axes = plt.subplots(1, len(ts), figsize=(2 * len(ts), 2.2))
for ax, t in zip(axes, ts):
    xt = schedule.q_sample(x0, torch.tensor([t]), noise)
    ax.imshow(xt[0, 0].clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
    ax.set_title(f"t={t}")
    ax.axis("off")
plt.show()
