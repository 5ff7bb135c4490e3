"""Tests for noisecraft.training.trainer: learning, exact resume, the run directory, crash safety, divergence.

Tiny U-Nets on scikit-learn's bundled digits (16×16, no download), one CPU thread: seconds per test.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from safetensors import safe_open

from noisecraft.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig, load_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.errors import NoisecraftError
from noisecraft.io import checkpoint
from noisecraft.io.checkpoint import existing_state_dir, load_json, load_weights
from noisecraft.models.unet import UNetConfig
from noisecraft.training import trainer as trainer_module
from noisecraft.training.loop import TrainingDiverged
from noisecraft.training.trainer import LOG_HEADER, Trainer, resume_trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train")


@pytest.fixture(scope="module")
def few_digits(digits):
    # 40 images at batch size 16: two batches per epoch, so a few steps cross epoch boundaries.
    return digits.subset(40)


def make_config(*, conditional=False, dropout=0.0, steps=10, batch_size=16, **train) -> RunConfig:
    model = UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                       attention_levels=(1,), head_dim=8, groups=4, dropout=dropout,
                       num_classes=10 if conditional else 0)
    train_kw = dict(batch_size=batch_size, lr=2e-3, warmup_steps=5, ema_decay=0.9, steps=steps,
                    sample_every=0, checkpoint_every=0, log_every=0, seed=7)
    train_kw.update(train)
    return RunConfig(model=model, diffusion=DiffusionConfig(schedule="cosine"), train=TrainConfig(**train_kw),
                     data=DataConfig(dataset="digits", image_shape=(1, 16, 16), class_names=[str(i) for i in range(10)],
                                     conditional=conditional))


def quiet(config, dataset, out) -> Trainer:
    return Trainer(config, dataset, out, progress=False)


def assert_same_tensors(a, b, where=""):
    """torch.equal on every tensor of two (nested) state dicts, and == on everything else."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def snapshot(trainer: Trainer) -> dict:
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "generator": trainer.generator.get_state(),
        "torch_global": torch.get_rng_state(),
        "step": trainer.step,
    }


def file_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- learning and the run directory


def test_loss_falls_on_digits_and_run_directory_is_complete(digits, tmp_path):
    config = make_config(steps=80, batch_size=32, log_every=1, warmup_steps=10)
    trainer = quiet(config, digits, tmp_path / "run")
    summary = trainer.fit()
    assert summary["steps"] == 80 and summary["steps_this_run"] == 80

    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == LOG_HEADER
    steps = [int(r[0]) for r in rows[1:]]
    losses = [float(r[1]) for r in rows[1:]]
    assert steps == list(range(1, 81))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)   # typically 0.65 -> 0.06
    assert summary["loss"] == pytest.approx(losses[-1], rel=1e-4)

    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"config.json", "model.safetensors", "state", "log.csv"}
    assert {p.name for p in (run / "state").iterdir()} == {
        "COMPLETE", "model.safetensors", "ema.safetensors", "optimizer.pt", "rng.safetensors", "trainer.json"}
    assert load_json(run / "state" / "COMPLETE") == {"step": 80}
    assert load_json(run / "state" / "trainer.json")["step"] == 80
    assert load_run_config(run) == config
    # model.safetensors holds the EMA weights (what sampling uses), labelled as such.
    assert_same_tensors(load_weights(run / "model.safetensors"), trainer.ema.state_dict())
    assert_same_tensors(load_weights(run / "state" / "model.safetensors"), trainer.model.state_dict())
    with safe_open(run / "model.safetensors", "pt") as f:
        assert f.metadata() == {"step": "80", "weights": "ema"}
    ema, raw = trainer.ema.state_dict(), trainer.model.state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_fit_needs_a_budget(few_digits, tmp_path):
    trainer = quiet(make_config(steps=None), few_digits, tmp_path / "run")
    with pytest.raises(NoisecraftError, match="--steps N or --minutes M"):
        trainer.fit()


def test_dataset_checks(few_digits, tmp_path):
    with pytest.raises(NoisecraftError, match="fewer than the batch size 64"):
        quiet(make_config(batch_size=64), few_digits, tmp_path / "a")
    with pytest.raises(NoisecraftError, match=r"shape \(1, 16, 16\) but the run expects \(1, 8, 8\)"):
        config = make_config()
        config.data.image_shape = (1, 8, 8)
        quiet(config, few_digits, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_odd_image_sizes_train_and_wrong_channels_are_refused_before_training(tmp_path):
    # 30×30 halves to 15 and then 8: the up path upsamples to each skip's size, as diffusers' U-Net does.
    data = load_dataset("digits", split="test", image_size=30)
    config = make_config(steps=2)
    config.model = UNetConfig(**{**config.model.to_dict(), "channel_mults": (1, 2, 2), "attention_levels": (2,)})
    config.data.image_shape = (1, 30, 30)
    quiet(config, data, tmp_path / "odd").fit()
    assert (tmp_path / "odd" / "model.safetensors").is_file()
    config.model = UNetConfig(**{**config.model.to_dict(), "in_channels": 3})
    with pytest.raises(NoisecraftError, match="N×3×H×W"):
        quiet(config, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- exact resume


def test_resume_is_bitwise_equal_to_a_straight_run(few_digits, tmp_path):
    # Dropout > 0 (global RNG) and label dropout (trainer generator) both have to be restored exactly.
    n = 3
    config = make_config(conditional=True, dropout=0.2, steps=2 * n, label_dropout=0.3, log_every=1)

    straight = quiet(config, few_digits, tmp_path / "straight")
    straight.fit()
    want = snapshot(straight)

    first = quiet(replace_steps(config, n), few_digits, tmp_path / "resumed")
    first.fit()
    assert first.step == n
    torch.manual_seed(12345)   # whatever happens to the global RNG in between must not matter
    second = resume_trainer(tmp_path / "resumed", few_digits, progress=False, steps=2 * n)
    assert second.step == n and second.config.train.steps == 2 * n
    second.fit()
    got = snapshot(second)

    assert got["step"] == want["step"] == 2 * n
    for part in ("model", "ema", "optimizer", "generator", "torch_global"):
        assert_same_tensors(got[part], want[part], part)
    assert file_bytes(tmp_path / "resumed" / "state") .keys() == file_bytes(tmp_path / "straight" / "state").keys()
    assert_same_tensors(load_weights(tmp_path / "resumed" / "model.safetensors"),
                        load_weights(tmp_path / "straight" / "model.safetensors"))
    # The resumed run's log continues the first one.
    with open(tmp_path / "resumed" / "log.csv", newline="") as f:
        assert [int(r[0]) for r in list(csv.reader(f))[1:]] == list(range(1, 2 * n + 1))


def test_resume_without_state_is_a_clear_error(few_digits, tmp_path):
    config = make_config()
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save_json(config.to_dict(), run / "config.json")
    with pytest.raises(NoisecraftError, match="no complete training state"):
        resume_trainer(run, few_digits, progress=False)
    with pytest.raises(NoisecraftError, match="no config.json"):
        resume_trainer(tmp_path / "elsewhere", few_digits, progress=False)


def replace_steps(config: RunConfig, steps: int) -> RunConfig:
    return RunConfig.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "steps": steps}})


# ---------------------------------------------------------------- crash safety


class CrashingOS:
    """Stands in for the `os` module inside io.checkpoint: os.replace raises when its source is named `when`."""

    def __init__(self, when: str):
        self.when, self.crashes = when, 0

    def replace(self, src, dst):
        if os.path.basename(os.fspath(src)) == self.when:
            self.crashes += 1
            raise OSError(f"simulated crash while renaming {src}")
        return os.replace(src, dst)

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.parametrize("crash_at", ["state", "state.tmp"])
def test_crash_during_checkpoint_swap_keeps_the_previous_checkpoint(few_digits, tmp_path, monkeypatch, crash_at):
    # crash_at="state": the new state is fully written to state.tmp, the old state/ not yet moved aside.
    # crash_at="state.tmp": state/ already moved to state.old, the new one not yet renamed into place.
    n = 2
    config = make_config(steps=n)
    run = tmp_path / "run"
    quiet(config, few_digits, run).fit()
    before = file_bytes(run / "state")
    ema_before = (run / "model.safetensors").read_bytes()

    trainer = resume_trainer(run, few_digits, progress=False, steps=2 * n)
    crashing = CrashingOS(crash_at)
    monkeypatch.setattr(checkpoint, "os", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.fit()
    assert crashing.crashes == 1
    monkeypatch.undo()

    found = existing_state_dir(run / "state")
    assert found is not None
    assert file_bytes(found) == before                     # the step-n checkpoint, byte for byte
    assert (run / "model.safetensors").read_bytes() == ema_before

    # Resuming picks up at step n and ends exactly where a straight 2n-step run ends.
    resumed = resume_trainer(run, few_digits, progress=False, steps=2 * n)
    assert resumed.step == n
    resumed.fit()
    straight = quiet(replace_steps(config, 2 * n), few_digits, tmp_path / "straight")
    straight.fit()
    for part in ("model", "ema", "optimizer"):
        assert_same_tensors(snapshot(resumed)[part], snapshot(straight)[part], part)
    assert existing_state_dir(run / "state") == run / "state"
    assert not (run / "state.old").exists() and not (run / "state.tmp").exists()


def test_second_crash_after_a_crash_mid_swap_still_keeps_a_checkpoint(few_digits, tmp_path, monkeypatch):
    # After a crash between the two renames only state.old is complete. Saving the next checkpoint must not
    # delete it before the new state is in place, or a second crash would leave nothing to resume from.
    n = 2
    run = tmp_path / "run"
    quiet(make_config(steps=n), few_digits, run).fit()
    before = file_bytes(run / "state")

    for _ in range(2):
        trainer = resume_trainer(run, few_digits, progress=False, steps=2 * n)
        assert trainer.step == n
        monkeypatch.setattr(checkpoint, "os", CrashingOS("state.tmp"))
        with pytest.raises(OSError, match="simulated crash"):
            trainer.fit()
        monkeypatch.undo()
        found = existing_state_dir(run / "state")
        assert found is not None, "the only complete checkpoint was deleted"
        assert file_bytes(found) == before


def test_leftover_tmp_state_is_ignored_and_cleaned(few_digits, tmp_path):
    run = tmp_path / "run"
    quiet(make_config(steps=2), few_digits, run).fit()
    junk = run / "state.tmp"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half a file")
    trainer = resume_trainer(run, few_digits, progress=False, steps=3)
    assert trainer.step == 2
    trainer.fit()
    assert not junk.exists()
    assert load_json(run / "state" / "COMPLETE") == {"step": 3}


# ---------------------------------------------------------------- divergence


def test_nan_loss_raises_training_diverged_and_keeps_the_last_checkpoint(few_digits, tmp_path, monkeypatch):
    real_loss = trainer_module.training_loss
    calls = []

    def loss_that_explodes_at_step_5(*args, **kwargs):
        calls.append(1)
        out = real_loss(*args, **kwargs)
        return out * float("nan") if len(calls) == 6 else out   # the 6th step (numbered from 1, as in log.csv)

    config = make_config(steps=10, checkpoint_every=2)
    run = tmp_path / "run"
    trainer = quiet(config, few_digits, run)
    monkeypatch.setattr(trainer_module, "training_loss", loss_that_explodes_at_step_5)
    with pytest.raises(TrainingDiverged, match="at step 6") as info:
        trainer.fit()
    assert issubclass(TrainingDiverged, NoisecraftError)
    assert "nan" in str(info.value) and "--lr" in str(info.value)
    monkeypatch.undo()

    # The checkpoint of step 4 is intact and finite, and training continues from it.
    assert load_json(run / "state" / "trainer.json")["step"] == 4
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_weights(run / "state" / name).values())
    with safe_open(run / "model.safetensors", "pt") as f:
        assert f.metadata()["step"] == "4"
    resumed = resume_trainer(run, few_digits, progress=False, steps=6)
    assert resumed.step == 4
    assert resumed.fit()["steps"] == 6
    assert json.loads((run / "state" / "COMPLETE").read_text()) == {"step": 6}
