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
# # 7. Latent diffusion: encode, decode, the latent channels, the scaling factor
#
# Latent diffusion runs the diffusion on $z_0 = s\cdot\mathcal E(x_0)$ and decodes the sample with
# $x = \mathcal D(z/s)$. Here: a small `AutoencoderKL` trained SD-style (L1 reconstruction, KL weight 1e-6) by the
# same `VAETrainer` as `noisecraft train-vae`, its four latent channels, and the scaling factor $s = 1/\mathrm{std}(z)$
# that gives the diffusion unit-variance latents (SD 1.x: 0.18215). `NOISECRAFT_TINY=1` (CI) trains 30 steps on the
# bundled 16×16 digits — the reconstructions are then blurry; unset it for 1500 steps. Chapter: `docs/tutorials/07-latent.md`.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import torch

from noisecraft.data.datasets import load_dataset
from noisecraft.models.vae import VAEConfig
from noisecraft.models.vae_loading import latent_scaling_factor
from noisecraft.training.vae_trainer import VAETrainConfig, VAETrainer

TINY = os.environ.get("NOISECRAFT_TINY") == "1"
STEPS = 30 if TINY else 1500
torch.set_num_threads(1 if TINY else torch.get_num_threads())
train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
run = tempfile.mkdtemp(prefix="vae-")           # the run directory `noisecraft train-vae --out` would write
trainer = VAETrainer(VAEConfig(in_channels=1, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
                               norm_groups=8),
                     VAETrainConfig(steps=STEPS, lr=2e-3, warmup_steps=10, checkpoint_every=0, scale_images=512,
                                    eval_images=128),
                     train, run, test_dataset=test, progress=False)
summary = trainer.fit()
vae = trainer.model.eval()
print(f"{summary['steps']} steps, PSNR {summary['psnr']:.1f} dB, scaling factor {summary['scaling_factor']:.4f}")

# %% [markdown]
# Encode: the encoder gives a diagonal Gaussian $q(z\mid x)$ per latent position; `.mode()` is its mean,
# `.sample()` draws $\mu + \sigma\varepsilon$. Three levels halve 16×16 twice: the latent is 4 channels × 4×4.

# %%
x, labels = test.batch(torch.arange(6))
with torch.no_grad():
    posterior = vae.encode(x)
    z = posterior.mode()
    recon = vae.decode(z).clamp(-1, 1)
print("image", tuple(x.shape), "-> latent", tuple(z.shape), "-> reconstruction", tuple(recon.shape))
# q(z|x)'s std starts near 1; with a KL weight of 1e-6 nothing holds it there, and it shrinks as training proceeds
print("posterior std (mean over latents):", f"{posterior.std.mean():.4f}")

fig, axes = plt.subplots(6, 6, figsize=(6, 6))
for i in range(6):
    axes[i, 0].imshow(x[i, 0], cmap="gray", vmin=-1, vmax=1)
    for c in range(4):
        axes[i, c + 1].imshow(z[i, c], cmap="viridis")
    axes[i, 5].imshow(recon[i, 0], cmap="gray", vmin=-1, vmax=1)
for j, title in enumerate(["input", "z0", "z1", "z2", "z3", "recon"]):
    axes[0, j].set_title(title, fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.show()

# %% [markdown]
# The scaling factor: the raw latents' spread is whatever the autoencoder learned; diffusion schedules assume
# unit-variance data, so latent runs multiply by $s$ before noising and divide by it before decoding
# (`DiffusionPipeline.encode` / `.decode`).

# %%
s = latent_scaling_factor(vae, train.images[:512])
with torch.no_grad():
    z_all = vae.encode(train.batch(torch.arange(512))[0]).sample(torch.Generator().manual_seed(0))
print(f"std(z) = {z_all.std():.3f}, s = {s:.4f}, std(s·z) = {(s * z_all).std():.3f}")
with torch.no_grad():
    roundtrip = vae.decode((s * z) / s)
print("decode(s·z / s) == decode(z):", torch.allclose(roundtrip, vae.decode(z), atol=1e-5))
