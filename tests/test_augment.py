"""Left-right flips while training (--hflip): which rows flip, that a sharded batch flips the same rows as the whole
batch, that resume stays exact, and that the flag is refused where a mirror is wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from noisecraft.cli import main
from noisecraft.config import LatentConfig, load_run_config
from noisecraft.data.augment import random_hflip
from noisecraft.errors import NoisecraftError
from noisecraft.training.trainer import Trainer, resume_trainer
from test_trainer import make_config, replace_steps


def test_flips_exactly_the_rows_whose_coin_came_up():
    x = torch.arange(6 * 2 * 3 * 4, dtype=torch.float32).reshape(6, 2, 3, 4)
    coins = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    out = random_hflip(x, torch.Generator().manual_seed(1), 6, slice(None))
    assert 0 < int(coins.sum()) < 6          # the seed flips some rows and keeps others
    for row in range(6):
        assert torch.equal(out[row], x[row].flip(-1) if coins[row] else x[row])


def test_each_process_flips_its_slice_of_the_whole_batch():
    x = torch.randn(8, 1, 4, 4)
    whole = random_hflip(x, torch.Generator().manual_seed(3), 8, slice(None))
    halves = [random_hflip(x[s], torch.Generator().manual_seed(3), 8, s) for s in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat(halves), whole)


def hflip_config(steps):
    config = make_config(steps=steps)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, hflip=True))


def test_flipped_training_resumes_exactly_and_differs_from_unflipped(few_digits, tmp_path):
    straight = Trainer(hflip_config(4), few_digits, tmp_path / "straight", progress=False)
    straight.fit()
    first = Trainer(replace_steps(hflip_config(4), 2), few_digits, tmp_path / "resumed", progress=False)
    first.fit()
    assert load_run_config(tmp_path / "resumed").data.hflip
    second = resume_trainer(tmp_path / "resumed", few_digits, progress=False, steps=4)
    second.fit()
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    plain = Trainer(make_config(steps=4), few_digits, tmp_path / "plain", progress=False)
    plain.fit()
    assert any(not torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(),
                                                     plain.model.state_dict().values()))


def test_hflip_is_refused_for_latent_runs(few_digits, tmp_path):
    config = dataclasses.replace(hflip_config(1), latent=LatentConfig(scaling_factor=1.0, latent_shape=(1, 16, 16)))
    with pytest.raises(NoisecraftError, match="drop --hflip for latent runs"):
        Trainer(config, few_digits, tmp_path / "run", progress=False)


def test_cli_hflip_is_a_run_setting(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--hflip", "--steps", "1", "--base-channels", "8",
                 "--sample-every", "0", "--out", str(run)]) == 0
    assert load_run_config(run).data.hflip
    assert main(["train", "--resume", str(run), "--hflip", "--steps", "2"]) == 2
    assert "--hflip cannot change when resuming" in capsys.readouterr().err
