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
# # 2. Noise schedules and the σ a sampler visits
#
# $\bar\alpha_t$, $\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$ and the SNR of the three schedules, then the σ
# per step of Stable Diffusion's LMS with 51 steps (`noisecraft viz sigmas --sampler lms --steps 51`).
# The guide's chapter: `docs/tutorials/02-schedules.md`.

# %%
import matplotlib.pyplot as plt

from noisecraft.commands.viz_tutorial import sampler_sigmas
from noisecraft.pipelines.defaults import STABLE_DIFFUSION
from noisecraft.schedule import NoiseSchedule

fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
for kind in ("linear", "scaled_linear", "cosine"):
    s = NoiseSchedule.create(kind, 1000)
    a.plot(s.alphas_cumprod, label=kind)
    b.semilogy(s.sigmas, label=kind)
a.set_title("alpha_bar_t")
b.set_title("sigma_t")
a.legend()
plt.show()

# %%
sd = NoiseSchedule.create("scaled_linear", 1000)
settings, sigmas = sampler_sigmas("lms", 51, sd, STABLE_DIFFUSION)
print(settings)
print([round(float(s), 4) for s in sigmas])
plt.plot(sigmas, ".-")
plt.xlabel("step")
plt.ylabel("sigma")
plt.show()
