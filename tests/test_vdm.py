"""Tests for variational diffusion models: models/vdm.py, training/vdm_trainer.py and commands/vdm.py.

Tiny U-Nets on scikit-learn's bundled digits (16×16, no download), one CPU thread.
"""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

from noisecraft.commands.vdm import add_parsers
from noisecraft.data.datasets import load_dataset
from noisecraft.errors import NoisecraftError
from noisecraft.io.checkpoint import load_json, save_json
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vdm import (
    LEVELS,
    VDM,
    FourierFeatures,
    MonotonicLogSNR,
    VDMConfig,
    alpha_sigma,
    level_values,
    low_discrepancy_times,
)
from noisecraft.training.vdm_trainer import LOG_HEADER, load_vdm, train_vdm, vdm_bits_per_dim

TINY = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), groups=4,
                  dropout=0.0)
TINY_ARGS = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-levels", "none",
             "--dropout", "0"]
TRAIN_STEPS = 150


def tiny_vdm(seed: int = 0, **vdm) -> VDM:
    torch.manual_seed(seed)
    return VDM(TINY, VDMConfig(image_shape=(1, 16, 16), **vdm))


def parse(argv):
    parser = argparse.ArgumentParser(prog="noisecraft")
    add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


@pytest.fixture(scope="module")
def trained(_one_thread, digits, tmp_path_factory):
    train, _ = digits
    out = tmp_path_factory.mktemp("vdm") / "run"
    summary = train_vdm(train, out, steps=TRAIN_STEPS, batch_size=16, lr=2e-3, unet=TINY, seed=1, progress=False,
                        warmup_steps=10, log_every=10, checkpoint_every=0)
    return out, summary


# --- the schedule -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_schedule_is_monotonic_between_its_endpoints(seed):
    torch.manual_seed(seed)
    sched = MonotonicLogSNR(gamma_0=-7.0, gamma_1=3.0, features=32)
    with torch.no_grad():                         # random parameters, far from the initialisation
        for p in sched.network_parameters():
            p.normal_(0, 3)
    t = torch.linspace(0, 1, 501)
    gamma, dgamma = sched.with_derivative(t)
    assert (gamma.diff() > 0).all() and (dgamma > 0).all()
    assert gamma[0].item() == pytest.approx(-7.0, abs=1e-5) and gamma[-1].item() == pytest.approx(3.0, abs=1e-5)
    alpha, sigma = alpha_sigma(gamma)
    # float32: α² + σ² is 1 to ~1 ulp (1.2e-7 seen) → atol 1e-6; log(α²/σ²) is a few ulps of |γ| ≤ 7 off (4.8e-7
    # seen), so atol 1e-3 is loose but still ≪ the range of γ it checks.
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(gamma), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.log(alpha ** 2 / sigma ** 2), -gamma, atol=1e-3, rtol=1e-4)   # log SNR = −γ
    # the closed-form γ'(t) is the derivative of γ(t)
    tt = torch.rand(16, requires_grad=True)
    grad, = torch.autograd.grad(sched(tt).sum(), tt)
    # float32: closed form vs autograd through the monotone network, γ' ≤ ~10 → rtol/atol 1e-4 (1e-6 seen)
    torch.testing.assert_close(sched.with_derivative(tt)[1].detach(), grad, rtol=1e-4, atol=1e-4)


def test_schedule_starts_linear_from_the_vdm_endpoints():
    sched = tiny_vdm().schedule
    gamma = sched(torch.linspace(0, 1, 11)).detach()
    # float32 γ: -13.3 itself rounds by 4.8e-7 and the affine map over values ≤ 18 adds a few ulps (2.9e-6 seen at
    # 5.0, 0.6 of approx's default 1e-6·5) → abs 1e-4, far below the 0.1s a wrong endpoint would be off by.
    assert gamma[0].item() == pytest.approx(-13.3, abs=1e-4) and gamma[-1].item() == pytest.approx(5.0, abs=1e-4)
    torch.testing.assert_close(gamma, torch.linspace(-13.3, 5.0, 11), atol=0.5, rtol=0)


def test_low_discrepancy_times_cover_the_unit_interval():
    t = low_discrepancy_times(8, torch.Generator().manual_seed(0))
    assert ((t >= 0) & (t < 1)).all()
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))      # one time in each eighth


def test_fourier_features():
    z = torch.randn(2, 3, 4, 5)
    f = FourierFeatures((7, 8))(z)
    assert f.shape == (2, 12, 4, 5)
    for c in range(3):      # per input channel: sin(2^7πz), sin(2^8πz), cos(2^7πz), cos(2^8πz)
        torch.testing.assert_close(f[:, 4 * c + 1], torch.sin(2 ** 8 * math.pi * z[:, c]))
        torch.testing.assert_close(f[:, 4 * c + 2], torch.cos(2 ** 7 * math.pi * z[:, c]))
    assert FourierFeatures(())(z).shape == (2, 0, 4, 5)
    assert tiny_vdm().unet_config.in_channels == 5 and tiny_vdm(fourier_exponents=()).unet_config.in_channels == 1


# --- the bound --------------------------------------------------------------------------------------

def test_reconstruction_categorical_sums_to_one_and_vanishes_without_noise(digits):
    model = tiny_vdm()
    z = torch.randn(2, 1, 16, 16) * 0.7
    for g0 in (-13.3, -2.0, 1.0):
        probs = model.reconstruction_logprobs(z, torch.tensor(g0)).exp()
        assert probs.shape == (2, 1, 16, 16, LEVELS)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 1, 16, 16), rtol=0, atol=1e-5)   # float32: 256 terms
    # z_0/α_0 exactly at a level: that level is the most likely
    probs = model.reconstruction_logprobs(level_values()[:10].view(1, 1, 1, 10), torch.tensor(-8.0)).exp()
    assert probs.argmax(-1).flatten().tolist() == list(range(10))

    x = digits[1].images[:8]
    recon = {}
    for g0 in (-20.0, -13.3, -5.0):
        with torch.no_grad():
            model.schedule.gamma_0.fill_(g0)
            recon[g0] = model.loss(x, torch.Generator().manual_seed(0)).reconstruction
    assert (recon[-20.0] < 1e-6).all()                       # α_0 → 1: the decoder is exact
    assert recon[-20.0].mean() < recon[-13.3].mean() < recon[-5.0].mean()
    assert recon[-5.0].mean() > 0.5


def test_loss_parts_are_finite_and_add_up(digits):
    model = tiny_vdm()
    x = digits[1].images[:8]
    terms = model.loss(x, torch.Generator().manual_seed(0))
    for part in terms:
        assert part.shape == (8,) and torch.isfinite(part).all() and (part >= 0).all()
    torch.testing.assert_close(terms.total, terms.diffusion + terms.prior + terms.reconstruction)
    # an untrained ε-net predicts 0, so the diffusion loss is ½·(γ_1 − γ_0)·E‖ε‖² at the linear start: ~13 bits/dim
    assert 10 < terms.diffusion.mean() < 17
    # float images in [-1, 1] give the same levels as uint8
    again = model.loss(x.float() / 127.5 - 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.total, terms.total)
    with pytest.raises(NoisecraftError, match="shape"):
        model.loss(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_variance_minimising_gradient(digits):
    """θ (schedule network) gets ∇ mean_i L_i² of the diffusion loss; γ_0, γ_1 and the U-Net the bound's gradient."""
    model = tiny_vdm(seed=3)
    with torch.no_grad():       # a trained-looking ε-net, so that the loss depends on the schedule's shape
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = digits[0].images[:6]
    theta = model.schedule.network_parameters()
    ends = model.schedule.endpoint_parameters()
    net = list(model.unet.parameters())

    model.zero_grad()
    model.loss(x, torch.Generator().manual_seed(5)).total.mean().backward()
    got_theta = [p.grad.clone() for p in theta]
    got_ends = [p.grad.clone() for p in ends]
    got_net = [p.grad.clone() for p in net]

    model.config.variance_minimisation = False             # the same batch, t and ε without the hook
    terms = model.loss(x, torch.Generator().manual_seed(5))
    want_theta = torch.autograd.grad(terms.diffusion.square().mean(), theta, retain_graph=True)
    vlb = torch.autograd.grad(terms.total.mean(), theta + ends + net)
    def close(got, want):     # float32 sums in another order: tolerance relative to the tensor's scale
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    for got, want in zip(got_theta, want_theta):
        close(got, want)
    for got, want in zip(got_ends + got_net, vlb[len(theta):]):
        close(got, want)
    # and the variance gradient really differs from the bound's
    assert not torch.allclose(got_theta[0], vlb[0], rtol=0.1)


# --- training, loading, sampling ----------------------------------------------------------------------

def test_training_lowers_the_bound(trained, digits):
    out, summary = trained
    test_images = digits[1].images[:96]
    before = vdm_bits_per_dim(tiny_vdm(seed=1), test_images, batch_size=48, generator=torch.Generator().manual_seed(0))
    model, config = load_vdm(out)
    after = vdm_bits_per_dim(model, test_images, batch_size=48, generator=torch.Generator().manual_seed(0))
    print(f"bits/dim untrained {before['mean']:.3f}, after {TRAIN_STEPS} steps {after['mean']:.3f} "
          f"± {after['stderr']:.3f}")
    assert math.isfinite(after["mean"]) and after["per_image"].shape == (96,)
    assert after["mean"] + 10 * after["stderr"] < before["mean"]
    assert after["mean"] < 0.6 * before["mean"]
    assert after["mean"] == pytest.approx(after["diffusion"] + after["prior"] + after["reconstruction"], rel=1e-5)
    assert summary["steps"] == TRAIN_STEPS and summary["bpd"] < before["mean"]
    assert config["kind"] == "vdm" and config["data"]["image_shape"] == [1, 16, 16]
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == LOG_HEADER and len(rows) == TRAIN_STEPS // 10
    assert float(rows[-1]["bpd"]) < float(rows[0]["bpd"])


def test_sampling_returns_images_on_the_pixel_grid(trained):
    model, _ = load_vdm(trained[0])
    a = model.sample(3, steps=6, generator=torch.Generator().manual_seed(0))
    b = model.sample(3, steps=6, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 1, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    levels = (a + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)   # float32: ulp(255) = 1.5e-5
    assert model.sample(2, steps=3, decode="argmax").shape == (2, 1, 16, 16)


def test_resume_continues_exactly(digits, tmp_path):
    data = digits[0].subset(48)
    kw = dict(batch_size=16, unet=TINY, seed=2, progress=False, log_every=0, checkpoint_every=0, warmup_steps=2)
    train_vdm(data, tmp_path / "straight", steps=6, **kw)
    train_vdm(data, tmp_path / "split", steps=3, **kw)
    train_vdm(data, tmp_path / "split", steps=6, resume=True, **kw)
    a, _ = load_vdm(tmp_path / "straight")
    b, _ = load_vdm(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    with pytest.raises(NoisecraftError, match="already holds a run"):
        train_vdm(data, tmp_path / "straight", steps=2, **kw)


def test_full_disk_keeps_the_previous_vdm_checkpoint_and_a_resume_trims_the_log(digits, tmp_path, monkeypatch):
    import errno

    import noisecraft.training.vdm_trainer as vdm_trainer
    from noisecraft.io.checkpoint import load_json
    data = digits[0].subset(48)
    kw = dict(batch_size=16, unet=TINY, seed=2, progress=False, log_every=1, checkpoint_every=0, warmup_steps=2)
    run = tmp_path / "run"
    train_vdm(data, run, steps=2, **kw)
    before = (run / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(vdm_trainer, "save_weights", full)
    with pytest.raises(NoisecraftError) as err:
        train_vdm(data, run, steps=4, resume=True, **kw)
    assert "No space left on device" in str(err.value) and "step 4" in str(err.value) and "\n" not in str(err.value)
    assert (run / "model.safetensors").read_bytes() == before        # the previous EMA weights survive
    monkeypatch.undo()
    # the failed invocation logged steps 3-4; its state (step 4) was saved whole before model.safetensors failed
    resumed_at = load_json(run / "state" / "COMPLETE")["step"]
    with open(run / "log.csv", "a") as f:      # as if a kill came after step 6 was logged, mid-row
        f.write("5,1.0,0.1,1.0,1.0\n6,1.0,0.1,1.0,1.0\n7,0.9")
    train_vdm(data, run, steps=5, resume=True, **kw)
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 6)) and resumed_at == 4


def test_load_vdm_refuses_other_runs(tmp_path):
    with pytest.raises(NoisecraftError, match="no config.json"):
        load_vdm(tmp_path)
    save_json({"kind": "vae", "model": {}}, tmp_path / "config.json")
    with pytest.raises(NoisecraftError, match="not a variational diffusion model"):
        load_vdm(tmp_path)
    with pytest.raises(NoisecraftError, match="Fourier exponents"):
        VDMConfig(fourier_exponents=(7, 99))


# --- the command line -------------------------------------------------------------------------------

def test_train_vdm_and_eval_vdm_commands(trained, tmp_path, capsys):
    out = tmp_path / "cli"
    args = parse(["train-vdm", "--dataset", "digits", "--out", str(out), "--steps", "2", "--batch-size", "8",
                  "--fourier", "8", "--quiet", *TINY_ARGS])
    assert args.func(args) == 0
    config = load_json(out / "config.json")
    assert config["kind"] == "vdm" and config["vdm"]["fourier_exponents"] == [8]
    assert config["model"]["base_channels"] == 8 and config["train"]["steps"] == 2
    assert "done: 2 steps" in capsys.readouterr().out
    model, _ = load_vdm(out)
    assert model.unet_config.in_channels == 3

    args = parse(["eval-vdm", str(trained[0]), "--split", "test", "--n", "40", "--batch-size", "20"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("bits/dim ") and "± " in printed and "40 test images of digits" in printed
    value = float(printed.split()[1])
    assert 0 < value < 10


@pytest.mark.parametrize("gamma_0", [-20.0, -13.3, -9.0, -5.0, 0.0])
def test_windowed_reconstruction_equals_the_full_categorical(gamma_0):
    model = tiny_vdm()
    levels = torch.randint(0, LEVELS, (2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    levels[0, 0, 0, :4] = torch.tensor([0, 1, 254, 255])                 # the edges of the range
    g0 = torch.tensor(gamma_0)
    noise = torch.randn(levels.shape, generator=torch.Generator().manual_seed(1))
    z = levels / 127.5 - 1 + math.exp(gamma_0 / 2) * noise
    full = -model.reconstruction_logprobs(z, g0).gather(-1, levels.unsqueeze(-1)).squeeze(-1)
    # float32: a window's log-sum-exp vs all 256 levels', NLL ≤ ~9 (9.5e-7 seen) → rtol/atol 1e-5
    torch.testing.assert_close(model.reconstruction_nll(z, levels, g0), full, rtol=1e-5, atol=1e-5)
