"""The shared training-loop bookkeeping: budget, windowed means, checkpoint cadence, Ctrl-C."""

import pytest

from noisecraft.errors import NoisecraftError
from noisecraft.training.loop import TrainingLoop


def test_needs_a_budget():
    with pytest.raises(NoisecraftError, match="training budget"):
        TrainingLoop(steps=None, minutes=None, batch_size=8)


def test_windowed_means_checkpoints_and_the_step_budget():
    loop = TrainingLoop(steps=6, minutes=None, step=1, batch_size=8, log_every=2, checkpoint_every=3, progress=False)
    rows, saves, step = [], [], 1
    with loop:
        while loop.more(step):
            step += 1
            window = loop.stepped(step, {"loss": float(step)})
            if window:
                rows.append((step, window["loss"]))
                assert window["images_per_s"] > 0
            if loop.checkpoint_due(step):
                saves.append(step)
    assert step == 6
    assert rows == [(2, 2.0), (4, 3.5), (6, 5.5)]      # the means since the previous row
    assert saves == [3, 6]


def test_time_budget_and_a_shared_clock():
    loop = TrainingLoop(steps=None, minutes=0.0, batch_size=8, progress=False)
    assert not loop.more(0)
    assert TrainingLoop(steps=None, minutes=10, batch_size=8, progress=False).more(0)
    assert not TrainingLoop(steps=None, minutes=10, batch_size=8, progress=False).more(0, time_up=True)


def test_ctrl_c_ends_the_loop_quietly_but_other_errors_pass():
    with TrainingLoop(steps=5, minutes=None, batch_size=8, progress=False):
        raise KeyboardInterrupt
    with pytest.raises(ValueError):
        with TrainingLoop(steps=5, minutes=None, batch_size=8, progress=False):
            raise ValueError("a bug stays visible")
