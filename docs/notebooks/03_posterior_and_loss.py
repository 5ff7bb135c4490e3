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
# # 3. The posterior and one training step by hand
#
# $q(x_{t-1}\mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t I)$ (`NoiseSchedule.posterior`), and DDPM's
# Algorithm 1 written out. Set `NOISECRAFT_TINY=1` for a quick run; unset it to train longer.
# The guide's chapter: `docs/tutorials/03-posterior-and-loss.md`.

# %%
import os

import torch
import torch.nn.functional as F

from noisecraft.data.datasets import load_dataset
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.schedule import NoiseSchedule

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
schedule = NoiseSchedule.create("cosine", 1000)
data = load_dataset("digits", split="train")

# %% [markdown]
# The posterior mean is a weighted average of $x_0$ and $x_t$; check it against the formula.

# %%
x0, _ = data.batch(torch.arange(4))
t = torch.tensor([300])
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
xt = schedule.q_sample(x0, t, noise)
mean, var = schedule.posterior(x0, xt, t)
ab, ab_prev, beta = schedule.alphas_cumprod[300], schedule.alphas_cumprod_prev[300], schedule.betas[300]
by_hand = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * xt
print("max |mean - formula| =", (mean - by_hand.float()).abs().max().item(), " variance:", var.flatten()[0].item())

# %% [markdown]
# Training: $t \sim U$, $\varepsilon \sim \mathcal N(0, I)$, $L_\text{simple} = \|\varepsilon - \varepsilon_\theta(x_t, t)\|^2$.

# %%
torch.manual_seed(0)
net = UNet(UNetConfig(in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                      attention_levels=(), dropout=0.0))
opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
g = torch.Generator().manual_seed(0)
losses = []
for step in range(20 if TINY else 500):
    x0, _ = data.batch(torch.randint(0, len(data), (32,), generator=g))
    t = torch.randint(0, schedule.T, (32,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    loss = F.mse_loss(net(schedule.q_sample(x0, t, eps), t), eps)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
