"""The guide's figures, made by the docs build (conf.py runs `make_all`) on the bundled 8×8 digits: no download,
no weights from anywhere, about a minute on one CPU core. Run it alone with `python docs/_scripts/figures.py OUT`.

Each figure is written to OUT (docs/_generated/) and is also what one `noisecraft` command shown on its page makes;
the tiny model trained here (a few hundred steps) is only good enough to show the mechanics, and the pages say so."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

TRAIN_STEPS = int(os.environ.get("NOISECRAFT_DOCS_STEPS", "300"))         # the tiny diffusion model
ELBO_STEPS = int(os.environ.get("NOISECRAFT_DOCS_VAE_STEPS", "200"))      # each of the two autoencoders


def _log(msg: str) -> None:
    LOG(f"[figures] {msg}")


LOG = print         # conf.py sets Sphinx's logger, so `sphinx -q` stays quiet


def forward(out: Path) -> None:
    from noisecraft.data.datasets import load_dataset
    from noisecraft.schedule import NoiseSchedule
    from noisecraft.viz.process import forward_strip

    dataset = load_dataset("digits", split="train")
    forward_strip(dataset, 0, NoiseSchedule.create("cosine", 1000), out / "forward_digit.png")
    forward_strip(dataset, 0, NoiseSchedule.create("linear", 1000), out / "forward_digit_linear.png")


def _command(argv: list[str]) -> None:
    """Run one `noisecraft` command line in-process, quietly: the figure is exactly what the page's command makes."""
    import contextlib
    import io

    from noisecraft.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        if main(argv) != 0:
            raise RuntimeError(f"noisecraft {' '.join(argv)} failed")


def photo(out: Path) -> None:
    """`viz forward --input` on a colour photograph that scikit-learn bundles (china.jpg), scaled to 128 px wide."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("china.jpg"))
    image.resize((128, round(128 * image.height / image.width)), Image.Resampling.BICUBIC).save(out / "photo.png")
    _command(["viz", "forward", "--input", str(out / "photo.png"), "--t", "0", "100", "250", "500", "750", "999",
              "--out", str(out / "forward_photo.png")])
    _command(["viz", "forward", "--input", str(out / "photo.png"), "--schedule", "linear", "--t", "0", "100", "250",
              "500", "750", "999", "--out", str(out / "forward_photo_linear.png")])
    _command(["viz", "sigmas", "--sampler", "lms", "--steps", "51", "--out", str(out / "sigmas_lms_51.png")])


def schedules(out: Path) -> None:
    from noisecraft.commands.viz_tutorial import sampler_sigmas
    from noisecraft.pipelines.defaults import STABLE_DIFFUSION
    from noisecraft.schedule import NoiseSchedule
    from noisecraft.viz.plots import plot_schedules
    from noisecraft.viz.tutorial import plot_sigmas

    plot_schedules({k: NoiseSchedule.create(k, 1000) for k in ("linear", "scaled_linear", "cosine")},
                   out / "schedules.png")
    sd = NoiseSchedule.create("scaled_linear", 1000)
    curves = {}
    for sampler, spacing in (("lms", "linspace"), ("lms", "leading"), ("lms", "trailing"), ("LMS Karras", None)):
        settings, sigmas = sampler_sigmas(sampler, 51, sd, STABLE_DIFFUSION, spacing)
        curves[f"{sampler}, {settings['spacing']} spacing" if spacing else f"{sampler} (EDM's ρ = 7)"] = sigmas
    plot_sigmas(curves, out / "sigmas_sd_51.png", title="Stable Diffusion's scaled_linear schedule, 51 steps")


def posterior(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from noisecraft.schedule import NoiseSchedule

    fig = Figure(figsize=(9, 3.2), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    for kind in ("linear", "cosine"):
        s = NoiseSchedule.create(kind, 1000)
        ax1.semilogy(s.betas.numpy(), label=f"β_t ({kind})")
        ax1.semilogy(s.posterior_variance.numpy()[1:], "--", label=f"β̃_t ({kind})")
        ax2.plot((s.posterior_variance[1:] / s.betas[1:]).numpy(), label=kind)
    ax1.set(xlabel="t", title="forward β_t and posterior variance β̃_t")
    ax2.set(xlabel="t", title="β̃_t / β_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t)", ylim=(0, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "posterior_variance.png")


def training_step(out: Path) -> None:
    """One training step of L_simple by hand, printed to a text file the page includes."""
    import torch.nn.functional as F

    from noisecraft.data.datasets import load_dataset
    from noisecraft.models.unet import UNet, UNetConfig
    from noisecraft.schedule import NoiseSchedule

    torch.manual_seed(0)
    data = load_dataset("digits", split="train")
    x0, _ = data.batch(torch.arange(8))
    schedule = NoiseSchedule.create("cosine", 1000)
    net = UNet(UNetConfig(in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                          attention_levels=(), dropout=0.0))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=g)            # t ~ U{0..T-1}
    eps = torch.randn(x0.shape, generator=g)                                  # ε ~ N(0, I)
    xt = schedule.q_sample(x0, t, eps)                                         # x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε
    loss = F.mse_loss(net(xt, t), eps)                                         # L_simple = ||ε − ε_θ(x_t, t)||²
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = F.mse_loss(net(xt, t), eps)
    (out / "training_step.txt").write_text(
        f"x0: {tuple(x0.shape)} in [{x0.min():.0f}, {x0.max():.0f}]\n"
        f"t: {t.tolist()}\n"
        f"L_simple before the step: {loss.item():.4f}\n"
        f"L_simple after one AdamW step on the same batch: {after.item():.4f}\n", encoding="utf-8")


def tiny_run(out: Path) -> Path:
    """A small class-conditional ε-prediction U-Net trained on the digits for TRAIN_STEPS steps, the label dropped
    to the null class for 20% of the images so that it is also an unconditional model (cached in OUT/run). The
    unconditional figures sample it with no label."""
    import json

    from noisecraft.config import make_run_config
    from noisecraft.data.datasets import load_dataset
    from noisecraft.training.trainer import Trainer

    run = out / "run"
    if (run / "model.safetensors").is_file() and (run / "config.json").is_file() and \
            json.loads((run / "config.json").read_text())["data"].get("conditional"):
        return run
    dataset = load_dataset("digits", split="train")
    config = make_run_config(dataset, conditional=True,            # the digits defaults, made smaller and faster
                             model=dict(base_channels=16, channel_mults=(1, 2), attention_levels=(1,)),
                             train=dict(batch_size=32, lr=3e-3, warmup_steps=50, ema_decay=0.99, steps=TRAIN_STEPS,
                                        sample_every=0, checkpoint_every=0, seed=0, label_dropout=0.2))
    Trainer(config, dataset, run, progress=False).fit()
    return run


def denoise_and_sample(out: Path, run: Path) -> None:
    from noisecraft.commands.viz_tutorial import denoise_step
    from noisecraft.data.datasets import load_dataset
    from noisecraft.pipelines.diffusion import DiffusionPipeline
    from noisecraft.viz.images import save_strip
    from noisecraft.viz.process import reverse_pictures
    from noisecraft.viz.tutorial import denoise_step_figure

    pipe = DiffusionPipeline.from_run(run)
    data = load_dataset("digits", split="test")
    x0, _ = data.batch(torch.arange(4))
    for t in (40, 400):
        r = denoise_step(pipe, x0, t, seed=0)
        denoise_step_figure(x0, r["xt"], r["noise"], r["eps_hat"], r["x0_hat"], out / f"denoise_step_t{t}.png", t=t)
    rows, names = [], []
    for sampler in ("ddpm", "ddim", "euler", "dpmpp_2m", "dpmpp_2m_sde", "heun"):
        rows.append(pipe.sample(8, sampler=sampler, steps=10, seed=0).images)
        names.append(sampler)
    save_strip(torch.stack(rows), out / "samplers_10_steps.png", rows=names)
    score = [pipe.sample(8, sampler=name, steps=10, seed=0).images for name in ("ddpm", "langevin", "pc")]
    save_strip(torch.stack(score), out / "score_samplers.png", rows=["ddpm", "langevin", "pc"])
    from noisecraft.guidance.objectives import brightness

    guided = [pipe.sample(8, seed=0).images] + [pipe.sample(8, seed=0, guide=brightness, guide_scale=k).images
                                                for k in (0.02, 0.05, 0.1)]
    save_strip(torch.stack(guided), out / "loss_guidance_brightness.png",
               rows=["no guide", "scale 0.02", "scale 0.05", "scale 0.1"])
    # the tutorials' recipe (guide mode "latents"): LMS, the latents moved by -k·σ²·∇ℓ every 5 steps but the first
    steered = [pipe.sample(8, sampler="lms", steps=10, seed=0).images] + [
        pipe.sample(8, sampler="lms", steps=10, seed=0, guide=brightness, guide_mode="latents", guide_scale=k,
                    guide_every=5).images for k in (0.1, 0.3, 1.0)]
    save_strip(torch.stack(steered), out / "latent_steering_brightness.png",
               rows=["LMS, no guide", "k = 0.1", "k = 0.3", "k = 1"])
    result = pipe.sample(1, sampler="ddpm", steps=10, seed=0, save_every=1)
    reverse_pictures(result.trajectory, out / "reverse_ddpm.png")


def classifier_free(out: Path, run: Path) -> None:
    """Chapter 9: the same seeds and labels 0..7 at w = 1 (no guidance), 2 and 4, and w = 0 (unconditional)."""
    from noisecraft.pipelines.diffusion import DiffusionPipeline
    from noisecraft.viz.images import save_strip

    pipe = DiffusionPipeline.from_run(run)
    labels = torch.arange(8)
    rows = [pipe.sample(8, sampler="ddim", steps=20, seed=0).images]
    rows += [pipe.sample(8, sampler="ddim", steps=20, seed=0, label=labels, guidance=w).images for w in (1.0, 2.0, 4.0)]
    save_strip(torch.stack(rows), out / "cfg_digits.png", rows=["no label", "w = 1", "w = 2", "w = 4"])


def latent_channels(out: Path) -> None:
    """Chapter 7: `noisecraft train-vae` on the digits (a few hundred steps, in-process and quiet), then
    `noisecraft viz latents` on four test digits: each row the input, its four latent channels and the reconstruction."""
    import numpy as np

    from noisecraft.data.datasets import load_dataset
    from noisecraft.models.vae import VAEConfig
    from noisecraft.training.vae_trainer import VAETrainConfig, VAETrainer

    if (out / "latents_digits.png").is_file() and (out / "latents_digits.txt").is_file():
        return
    run = out / "vae"
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    if not (run / "model.safetensors").is_file():
        import contextlib
        import io

        trainer = VAETrainer(VAEConfig(in_channels=1, latent_channels=4, block_out_channels=(16, 32, 32),
                                       layers_per_block=1, norm_groups=8),
                             VAETrainConfig(steps=ELBO_STEPS, lr=2e-3, warmup_steps=20, checkpoint_every=0,
                                            scale_images=512, eval_images=256),
                             train, run, test_dataset=test, progress=False)
        with contextlib.redirect_stdout(io.StringIO()):
            summary = trainer.fit()
        (run / "summary.txt").write_text(f"{summary['psnr']:.2f} {summary['scaling_factor']:.5f}\n")
    psnr, scale = (run / "summary.txt").read_text().split()
    x, _ = test.batch(torch.arange(4))
    images = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    np.savez(out / "digits4.npz", images=images)
    _command(["viz", "latents", str(out / "digits4.npz"), "--vae", str(run), "--out", str(out / "latents_digits.png")])
    (out / "latents_digits.txt").write_text(
        f"autoencoder: 1×16×16 digits -> latents 4×4×4 (3 levels of 16, 32, 32 channels), {ELBO_STEPS} steps\n"
        f"reconstruction PSNR on 256 test digits: {psnr} dB\n"
        f"latent scaling factor s = 1 / std(z): {scale}   (SD 1.x: 0.18215)\n", encoding="utf-8")


def cross_attention(out: Path) -> None:
    """Chapter 8: the attention weights softmax(QKᵀ/√d) of the first cross-attention layer of a tiny
    text-conditional U-Net with random weights, for one prompt, one map per token (mean over heads): Q comes from
    the noisy digit's feature map, K and V from the text encoder's per-token output."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from noisecraft.data.datasets import load_dataset
    from noisecraft.models.clip import CLIPTextConfig, CLIPTextTransformer
    from noisecraft.models.tokenizer import CLIPTokenizer
    from noisecraft.models.unet import UNet, UNetConfig
    from noisecraft.schedule import NoiseSchedule

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_bpe_file()
    prompt = "a handwritten digit seven"
    ids = tok([prompt])
    encoder = CLIPTextTransformer(CLIPTextConfig(width=64, layers=2, heads=4))
    net = UNet(UNetConfig(in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                          attention_levels=(1,), dropout=0.0, context_dim=64))
    layer = next(m for m in net.modules() if getattr(m, "attn2", None) is not None).attn2
    seen = {}

    def grab(module, args, kwargs):
        seen["x"], seen["context"] = args[0], args[1] if len(args) > 1 else kwargs["context"]

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    test = load_dataset("digits", split="test")
    x0, _ = test.batch((test.labels == 7).nonzero()[:1, 0])                 # a test seven
    schedule = NoiseSchedule.create("cosine", 1000)
    t = torch.tensor([200])
    with torch.no_grad():
        context, _ = encoder(ids)
        xt = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
        net(xt, t, context)
        handle.remove()
        q = layer.split_heads(layer.to_q(seen["x"]))                      # B×heads×N×d, N = image positions
        k = layer.split_heads(layer.to_k(seen["context"]))                # B×heads×77×d
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)[0]   # N×77
    side = int(weights.shape[0] ** 0.5)
    end = int((ids[0] == 49407).nonzero()[0]) + 1
    pieces = ["<start>"] + tok.tokenize(prompt) + ["<end>"]
    fig = Figure(figsize=(1.45 * (end + 1), 2.2), dpi=110)
    axes = fig.subplots(1, end + 1)
    axes[0].imshow(xt[0, 0], cmap="gray")
    axes[0].set_title("x_t (t = 200)", fontsize=8)
    for j in range(end):
        axes[j + 1].imshow(weights[:, j].reshape(side, side), cmap="magma", vmin=0, vmax=float(weights[:, :end].max()))
        axes[j + 1].set_title(f"{pieces[j]!s}\n(id {int(ids[0, j])})", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"cross-attention weights of one layer ({side}×{side} queries × 77 keys), random weights: "
                 f"mechanics only", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cross_attention.png")
    rest = float(weights[:, end:].sum(1).mean())
    (out / "cross_attention.txt").write_text(
        f"prompt {prompt!r}: Q {tuple(q.shape)} from the {side}×{side} feature map, K {tuple(k.shape)} from the "
        f"77 text tokens (batch × heads × tokens × head_dim)\n"
        f"each query's weights over the 77 keys sum to 1; the {77 - end} padding tokens after <end> take "
        f"{rest:.0%} of it on average\n", encoding="utf-8")


def tokenizer(out: Path) -> None:
    from noisecraft.models.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_bpe_file()
    prompt = "a dog wearing hat"
    ids = [int(i) for i in tok([prompt])[0]]
    end = ids.index(49407) + 1
    text = (f"prompt:  {prompt!r}\n"
            f"pieces:  {tok.tokenize(prompt)}\n"
            f"ids:     {ids[:end]}  (49406 = start, 49407 = end)\n"
            f"padding: {len(ids) - end} more ids, to the fixed length {len(ids)}\n")
    (out / "tokenizer.txt").write_text(text, encoding="utf-8")


def elbo_vae(out: Path, steps: int | None = None) -> None:
    """The same small AutoencoderKL trained twice on the digits: on its ELBO (Gaussian likelihood with σ_x = 0.2,
    full KL weight) and SD-style (KL weight 1e-6). Reconstructions, samples decoded from the prior z ~ N(0, I), and
    the two terms of the ELBO of each on the test digits."""
    import math

    from noisecraft.data.datasets import load_dataset
    from noisecraft.models.vae import AutoencoderKL, VAEConfig
    from noisecraft.viz.images import save_strip

    steps = steps or ELBO_STEPS
    if (out / "vae_elbo.png").is_file() and (out / "vae_elbo.txt").is_file():
        return                                                    # cached: delete docs/_generated to remake
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    x_test, _ = test.batch(torch.arange(256))
    sigma_x, rows, names, lines = 0.2, [], [], []
    for name, kl_weight in (("ELBO (KL weight 1)", 1.0), ("SD-style (KL weight 1e-6)", 1e-6)):
        torch.manual_seed(0)
        vae = AutoencoderKL(VAEConfig(in_channels=1, latent_channels=4, block_out_channels=(16, 32, 32),
                                      layers_per_block=1, norm_groups=8, mid_attention=False))
        opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)

        def terms(x, generator=None, vae=vae):
            posterior = vae.encode(x)
            z = posterior.sample(generator)                       # z = μ + σ·ε (reparameterisation)
            x_hat = vae.decode(z)
            nll = (0.5 * ((x - x_hat) / sigma_x) ** 2 + math.log(sigma_x * math.sqrt(2 * math.pi))).flatten(1).sum(1)
            return nll, posterior.kl()                            # KL summed over each latent

        for _ in range(steps):
            x, _ = train.batch(torch.randint(0, len(train), (32,), generator=g))
            nll, kl = terms(x, g)
            loss = (nll + kl_weight * kl).mean() / x[0].numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        vae.eval()
        with torch.no_grad():
            nll, kl = terms(x_test, torch.Generator().manual_seed(1))
            recon = vae.decode(vae.encode(x_test[:8]).mode()).clamp(-1, 1)
            latent_shape = vae.encode(x_test[:1]).mode().shape[1:]
            prior = vae.decode(torch.randn(8, *latent_shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
        rows += [recon, prior]
        names += [f"{name.split()[0]}: recon", f"{name.split()[0]}: prior"]
        lines.append(f"{name:27s} reconstruction −E[log p(x|z)] = {nll.mean():8.1f} nats, KL(q(z|x) ‖ N(0,I)) = "
                     f"{kl.mean():8.1f} nats, −ELBO = {(nll + kl).mean():8.1f} nats per image")
    save_strip(torch.stack([x_test[:8]] + rows), out / "vae_elbo.png", rows=["data"] + names)
    (out / "vae_elbo.txt").write_text(f"latent {tuple(latent_shape)} for 1×16×16 digits, {steps} steps each, "
                                      f"σ_x = {sigma_x}\n" + "\n".join(lines) + "\n", encoding="utf-8")


STEPS = [("forward", forward), ("photo", photo), ("schedules", schedules), ("posterior", posterior), ("training step", training_step),
         ("tokenizer", tokenizer), ("cross-attention", cross_attention),
         ("ELBO vs SD-style autoencoder", elbo_vae), ("latent channels", latent_channels)]


def make_all(out, log=None) -> None:
    global LOG
    LOG = log or print
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.time()
    for name, fn in STEPS:
        fn(out)
        _log(f"{name}: {time.time() - start:.1f} s")
    run = tiny_run(out)
    _log(f"tiny run ({TRAIN_STEPS} steps): {time.time() - start:.1f} s")
    denoise_and_sample(out, run)
    _log(f"denoise step and samplers: {time.time() - start:.1f} s")
    classifier_free(out, run)
    _log(f"classifier-free guidance: {time.time() - start:.1f} s")


if __name__ == "__main__":
    make_all(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "_generated")
