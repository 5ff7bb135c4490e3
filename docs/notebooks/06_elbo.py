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
# # 6. A VAE trained on its ELBO, beside Stable Diffusion's KL-regularised autoencoder
#
# $\log p(x) \ge \mathbb E_{q(z\mid x)}[\log p(x\mid z)] - D_\mathrm{KL}(q(z\mid x)\,\|\,\mathcal N(0, I))$ with the
# reparameterisation $z = \mu + \sigma\odot\varepsilon$ (`DiagonalGaussian.sample`). The same `AutoencoderKL` is
# trained with KL weight 1 (the ELBO) and 1e-6 (SD-style); then decode samples of the prior $z\sim\mathcal N(0, I)$.
# `NOISECRAFT_TINY=1` trains for a few steps; unset it for 1000. The guide's chapter: `docs/tutorials/06-elbo.md`.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

from noisecraft.data.datasets import load_dataset
from noisecraft.models.vae import AutoencoderKL, VAEConfig

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
STEPS = 10 if TINY else 1000
SIGMA_X = 0.2                                   # p(x | z) = N(decoder(z), σ_x² I)
train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
x_test, _ = test.batch(torch.arange(256))


def elbo_terms(vae, x, generator=None):
    """(−E[log p(x|z)], KL(q(z|x) ‖ N(0, I))) per image, in nats, with one reparameterised sample of z."""
    posterior = vae.encode(x)
    z = posterior.sample(generator)
    x_hat = vae.decode(z)
    nll = (0.5 * ((x - x_hat) / SIGMA_X) ** 2 + math.log(SIGMA_X * math.sqrt(2 * math.pi))).flatten(1).sum(1)
    return nll, posterior.kl()


# %%
models = {}
for name, kl_weight in (("ELBO", 1.0), ("SD-style", 1e-6)):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(in_channels=1, latent_channels=4, block_out_channels=(16, 32, 32),
                                  layers_per_block=1, norm_groups=8, mid_attention=False))
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        x, _ = train.batch(torch.randint(0, len(train), (32,), generator=g))
        nll, kl = elbo_terms(vae, x, g)
        loss = (nll + kl_weight * kl).mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        nll, kl = elbo_terms(vae, x_test, torch.Generator().manual_seed(1))
    print(f"{name:9s} reconstruction {nll.mean():8.1f}  KL {kl.mean():7.1f}  -ELBO {(nll + kl).mean():8.1f} nats/image")
    models[name] = vae

# %%
fig, axes = plt.subplots(2, 8, figsize=(8, 2.4))
with torch.no_grad():
    for row, (name, vae) in enumerate(models.items()):
        shape = vae.encode(x_test[:1]).mode().shape[1:]
        samples = vae.decode(torch.randn(8, *shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
        for j in range(8):
            axes[row, j].imshow(samples[j, 0], cmap="gray", vmin=-1, vmax=1)
            axes[row, j].axis("off")
        axes[row, 0].set_title(f"{name}: z ~ N(0, I)", fontsize=8, loc="left")
plt.show()
