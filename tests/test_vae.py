"""Tests for the KL autoencoder (models/vae.py), its trainer (training/vae_trainer.py) and commands (commands/vae.py).

Parity: a tiny random diffusers AutoencoderKL loads into ours with strict load_state_dict, and encode/decode agree.
Training runs use scikit-learn's bundled digits at 8×8 (three levels -> 2×2 latents), one CPU thread.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.commands import vae as vae_commands
from noisecraft.commands.arg_types import int_list
from noisecraft.data.datasets import load_dataset
from noisecraft.errors import NoisecraftError
from noisecraft.io.checkpoint import load_json, load_weights, save_json
from noisecraft.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from noisecraft.models.vae_loading import encode_dataset, latent_scaling_factor, load_vae, reconstruction_psnr
from noisecraft.training.loop import TrainingDiverged
from noisecraft.training.vae_trainer import LOG_HEADER, VAETrainConfig, VAETrainer, train_vae

TINY = VAEConfig(in_channels=1, latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1, norm_groups=4)


def tiny_train(**kw) -> VAETrainConfig:
    base = dict(batch_size=16, steps=12, warmup_steps=4, log_every=4, checkpoint_every=0, scale_images=256, seed=3)
    base.update(kw)
    return VAETrainConfig(**base)


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", split="train", image_size=8), load_dataset("digits", split="test", image_size=8)


@pytest.fixture(scope="module")
def run_dir(_one_thread, digits8, tmp_path_factory):
    train, test = digits8
    out = tmp_path_factory.mktemp("vae") / "run"
    summary = train_vae(TINY, tiny_train(steps=40, lr=3e-3), train.subset(400), out, test, progress=False)
    return out, summary


# --- the model --------------------------------------------------------------------------------------

def test_shapes_mnist_default_and_tiny():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig())
    assert vae.config.downsample_factor == 4
    with torch.no_grad():
        post = vae.encode(torch.zeros(2, 1, 28, 28))
        assert post.mean.shape == post.logvar.shape == post.std.shape == (2, 4, 7, 7)
        assert vae.decode(post.sample()).shape == (2, 1, 28, 28)
    tiny = AutoencoderKL(TINY)
    recon, post = tiny(torch.rand(3, 1, 8, 8) * 2 - 1)
    assert recon.shape == (3, 1, 8, 8) and post.mean.shape == (3, 4, 2, 2)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    recon, post = vae(x, generator=torch.Generator().manual_seed(0))
    ((recon - x).abs().mean() + post.kl().mean()).backward()
    missing = [name for name, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_forward_sampling_is_seeded_and_mode_is_deterministic():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        a, _ = vae(x, generator=torch.Generator().manual_seed(5))
        b, _ = vae(x, generator=torch.Generator().manual_seed(5))
        c, _ = vae(x, generator=torch.Generator().manual_seed(6))
        d, post = vae(x, sample=False)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.equal(d, vae.decode(post.mean))


def test_clear_errors_for_bad_inputs_and_configs():
    vae = AutoencoderKL(TINY)
    with pytest.raises(NoisecraftError, match="not divisible by 4"):
        vae.encode(torch.zeros(1, 1, 10, 8))
    with pytest.raises(NoisecraftError, match="N×1×H×W"):
        vae.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(NoisecraftError, match="latents of shape N×4"):
        vae.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(NoisecraftError, match="divisible by norm_groups"):
        VAEConfig(block_out_channels=(32, 60), norm_groups=8)
    with pytest.raises(NoisecraftError, match="positive integer"):
        VAEConfig(latent_channels=0)
    with pytest.raises(NoisecraftError, match="unknown VAE settings"):
        VAEConfig.from_dict({"in_channels": 1, "channels": 3})
    with pytest.raises(NoisecraftError, match="block_out_channels"):
        VAEConfig(block_out_channels=())


def test_config_round_trip():
    config = VAEConfig(in_channels=3, latent_channels=8, block_out_channels=[16, 32], layers_per_block=2,
                       norm_groups=4, mid_attention=False)
    d = json.loads(json.dumps(config.to_dict()))
    assert d["block_out_channels"] == [16, 32]
    again = VAEConfig.from_dict(d)
    assert again == config and again.downsample_factor == 2


def test_kl_matches_torch_distributions_and_logvar_is_clamped():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    post = DiagonalGaussian.from_moments(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl(), expected, rtol=1e-5, atol=1e-5)   # float32, other formula: sums ≤ ~24
    assert torch.equal(post.mode(), mean)
    extreme = DiagonalGaussian(torch.zeros(1), torch.tensor([100.0, -100.0]))
    assert extreme.logvar.tolist() == [20.0, -30.0] and torch.isfinite(extreme.var).all()


def test_sample_has_the_posterior_statistics():
    post = DiagonalGaussian(torch.full((4000, 1, 1, 1), 2.0), torch.full((4000, 1, 1, 1), np.log(0.25)))
    z = post.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 2.0) < 0.05 and abs(z.std().item() - 0.5) < 0.03


@pytest.mark.parametrize("in_ch,widths,layers,attention", [(1, (8, 16), 1, True), (3, (8, 8, 16), 2, False)])
def test_parity_with_diffusers_autoencoder_kl(in_ch, widths, layers, attention):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(
        in_channels=in_ch, out_channels=in_ch, latent_channels=4, block_out_channels=widths,
        layers_per_block=layers, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths), mid_block_add_attention=attention).eval()
    with torch.no_grad():       # move every weight off its default (GroupNorm 1/0 etc.) so each one matters
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = AutoencoderKL(VAEConfig(in_channels=in_ch, latent_channels=4, block_out_channels=widths,
                                   layers_per_block=layers, norm_groups=4, mid_attention=attention)).eval()
    state = theirs.state_dict()
    assert set(ours.state_dict()) == set(state)
    ours.load_state_dict(state, strict=True)
    side = 4 * ours.config.downsample_factor
    x = torch.rand(2, in_ch, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs.encode(x).latent_dist
        got = ours.encode(x)
        # float32, diffusers' kernels vs ours: moments and pixels ≤ ~2.5 (1.3e-6 seen) → atol 1e-5
        torch.testing.assert_close(got.mean, expected.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.logvar, expected.logvar, atol=1e-5, rtol=0)
        assert expected.mean.abs().max() > 1e-2          # the comparison is not between near-zero tensors
        decoded = theirs.decode(z).sample
        torch.testing.assert_close(ours.decode(z), decoded, atol=1e-5, rtol=0)
        assert decoded.std() > 1e-2


# --- training -----------------------------------------------------------------------------------------

def test_run_directory_is_complete_and_loadable(run_dir, digits8):
    out, summary = run_dir
    config = load_json(out / "config.json")
    assert config["kind"] == "vae" and config["model"] == TINY.to_dict()
    assert config["data"] == {"dataset": "digits", "image_shape": [1, 8, 8]}
    assert config["train"]["steps"] == 40 and config["train"]["kl_weight"] == 1e-6
    metrics = config["metrics"]
    assert metrics["complete"] and metrics["psnr_split"] == "test" and metrics["psnr_images"] == 297
    assert 5 < metrics["psnr"] < 60 and metrics["psnr"] == summary["psnr"]
    assert config["scaling_factor"] == metrics["scaling_factor"] > 0
    with open(out / "log.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == LOG_HEADER and [r[0] for r in rows[1:]] == [str(s) for s in range(4, 41, 4)]
    assert float(rows[-1][2]) < float(rows[1][2])           # the reconstruction loss went down

    vae, scale, loaded = load_vae(out)
    assert scale == config["scaling_factor"] and loaded == config and not vae.training
    _, test = digits8
    assert reconstruction_psnr(vae, test) == pytest.approx(metrics["psnr"], abs=1e-3)


def test_training_improves_psnr_and_is_seeded(_one_thread, digits8, tmp_path):
    train, test = digits8
    untrained = reconstruction_psnr(AutoencoderKL(TINY), test)
    a = train_vae(TINY, tiny_train(steps=6), train.subset(100), tmp_path / "a", test, progress=False)
    b = train_vae(TINY, tiny_train(steps=6), train.subset(100), tmp_path / "b", test, progress=False)
    assert a["psnr"] == b["psnr"] and a["scaling_factor"] == b["scaling_factor"]
    wa, wb = load_weights(tmp_path / "a" / "model.safetensors"), load_weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["psnr"] > untrained


def test_encode_dataset_and_scaling_factor(run_dir, digits8):
    vae, scale, _ = load_vae(run_dir[0])
    _, test = digits8
    mean, std = encode_dataset(vae, test, batch_size=100)
    assert mean.shape == std.shape == (297, 4, 2, 2) and mean.dtype == std.dtype == torch.float32
    with torch.no_grad():
        direct = vae.encode(test.batch(torch.arange(5))[0])
    # float32: batches of 100, 5 and 7 take other conv kernels; moments ≤ ~1.2 (1.8e-7 seen) → atol 1e-5
    torch.testing.assert_close(mean[:5], direct.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std[:5], direct.std, rtol=1e-5, atol=1e-5)
    mean2, _ = encode_dataset(vae, test.images.numpy()[:7])                   # uint8 arrays work too
    torch.testing.assert_close(mean2, mean[:7], rtol=1e-5, atol=1e-5)
    s = latent_scaling_factor(vae, test, n=297, seed=0)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert s == pytest.approx(1 / z.std().item(), rel=0.05)


def test_gan_and_l2_run(_one_thread, digits8, tmp_path):
    train, test = digits8
    summary = train_vae(TINY, tiny_train(steps=8, gan=True, gan_start=4, loss="l2"), train.subset(64), tmp_path,
                        test, progress=False)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["d_loss"]) == 0 and float(rows[1]["d_loss"]) > 0       # D joins after gan_start
    assert summary["psnr"] > 0


def test_lr_warmup_then_cosine_decay(digits8, tmp_path):
    trainer = VAETrainer(TINY, tiny_train(steps=100, warmup_steps=10, lr=1e-3), digits8[0], tmp_path, progress=False)
    lrs = []
    for step in (0, 9, 10, 55, 100):
        trainer.step = step
        lrs.append(trainer.lr_now())
    assert lrs[0] == pytest.approx(1e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2] > lrs[3] > lrs[4] == pytest.approx(1e-4)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(_one_thread, digits8, tmp_path, monkeypatch):
    train, test = digits8
    trainer = VAETrainer(TINY, tiny_train(steps=20, checkpoint_every=3), train.subset(64), tmp_path, test,
                         progress=False)
    real = trainer.losses

    def poisoned(x):
        terms = real(x)
        if trainer.step == 4:                                  # the 5th step
            terms["loss"] = terms["loss"] * float("nan")
        return terms
    monkeypatch.setattr(trainer, "losses", poisoned)
    with pytest.raises(TrainingDiverged, match=r"nan at step 5.*keeps the last good checkpoint \(step 3"):
        trainer.fit()
    config = load_json(tmp_path / "config.json")
    assert config["metrics"]["steps"] == 3 and config["metrics"]["diverged_at_step"] == 5
    vae, scale, _ = load_vae(tmp_path)
    assert all(torch.isfinite(p).all() for p in vae.parameters()) and scale > 0


def test_nan_before_any_checkpoint(_one_thread, digits8, tmp_path, monkeypatch):
    trainer = VAETrainer(TINY, tiny_train(steps=5), digits8[0].subset(32), tmp_path, progress=False)
    monkeypatch.setattr(trainer, "losses", lambda x: {"loss": torch.tensor(float("inf"))})
    with pytest.raises(TrainingDiverged, match="at step 1, before any checkpoint"):
        trainer.fit()
    assert not (tmp_path / "config.json").exists()


def test_trainer_refuses_bad_setups(digits8, tmp_path):
    train, test = digits8
    with pytest.raises(NoisecraftError, match="not divisible by 8"):
        VAETrainer(VAEConfig(block_out_channels=(8, 8, 8, 8), norm_groups=4), tiny_train(), load_dataset(
            "digits", image_size=12).subset(32), tmp_path, progress=False)
    with pytest.raises(NoisecraftError, match="fewer than the batch size"):
        VAETrainer(TINY, tiny_train(batch_size=64), train.subset(10), tmp_path, progress=False)
    with pytest.raises(NoisecraftError, match="budget"):
        VAETrainer(TINY, tiny_train(steps=None), train.subset(32), tmp_path, progress=False).fit()
    with pytest.raises(NoisecraftError, match="l1 or l2"):
        tiny_train(loss="l3")


def test_load_vae_clear_errors(run_dir, tmp_path):
    out = run_dir[0]
    with pytest.raises(NoisecraftError, match="no config.json"):
        load_vae(tmp_path / "missing")
    save_json({"model": {}, "diffusion": {}}, tmp_path / "pixel" / "config.json")
    with pytest.raises(NoisecraftError, match="not an autoencoder"):
        load_vae(tmp_path / "pixel")
    config = load_json(out / "config.json")
    bad = tmp_path / "bad"
    save_json({**config, "model": {**config["model"], "latent_channels": 8}}, bad / "config.json")
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(NoisecraftError, match="do not fit"):
        load_vae(bad)
    save_json({**config, "scaling_factor": None}, bad / "config.json")
    with pytest.raises(NoisecraftError, match="scaling factor"):
        load_vae(bad)
    save_json(config, bad / "config.json")
    (bad / "model.safetensors").unlink()
    with pytest.raises(NoisecraftError, match="does not exist"):
        load_vae(bad)


# --- commands ------------------------------------------------------------------------------------------

def test_latent_figure_writes_a_png(run_dir, digits8, tmp_path):
    vae, _, _ = load_vae(run_dir[0])
    images = digits8[1].batch(torch.arange(2))[0]
    path = vae_commands.latent_figure(vae, images, tmp_path / "latents.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    # 2 rows of 6 cells (input, z0..z3, recon), each upscaled to >= 64 px, plus a caption band
    assert w >= 6 * 64 and 2 * 64 <= h < 3 * 64 + 40
    gray = np.asarray(Image.open(path).convert("L"))
    assert gray.std() > 10                                      # not a blank picture


def parse(argv):
    """Our sub-commands through the real CLI when it is wired, else through a parser with add_parsers."""
    from noisecraft import cli
    if "train-vae" in cli.build_parser()._subparsers._group_actions[0].choices:
        return cli.main(argv)
    parser = argparse.ArgumentParser()
    vae_commands.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NoisecraftError as e:
        print(f"noisecraft: error: {e}", file=sys.stderr)
        return 2


def test_train_vae_command_and_viz_latents(_one_thread, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train-vae", "--dataset", "digits", "--image-size", "8", "--out", str(out), "--steps", "3",
            "--batch-size", "16", "--channels", "8,8,16", "--norm-groups", "4", "--latent-channels", "3", "--seed", "1"]
    assert parse(argv) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "scaling factor" in printed and "latents 3x2x2" in printed
    vae, scale, config = load_vae(out)
    assert config["model"]["latent_channels"] == 3 and config["train"]["steps"] == 3
    assert parse(argv) == 2                                    # an existing run is never overwritten
    captured = capsys.readouterr()
    assert "already holds a run" in captured.out + captured.err

    digit = np.asarray(load_dataset("digits", split="test").images[0, 0])
    Image.fromarray(digit).save(tmp_path / "digit.png")
    assert parse(["viz", "latents", str(tmp_path / "digit.png"), "--vae", str(out), "--out", str(tmp_path / "lat.png")]) == 0
    assert Image.open(tmp_path / "lat.png").size[0] >= 5 * 64
    capsys.readouterr()
    assert parse(["viz", "latents", str(tmp_path / "digit.png")]) == 2
    assert "--vae" in capsys.readouterr().err
    with pytest.raises(NoisecraftError, match="integers"):
        int_list("8,x", "--channels")
