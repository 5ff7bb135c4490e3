"""Fault tolerance of `noisecraft train`: SIGKILL at random moments (benchmarks/kill_resume.py, in small), a full disk
while a checkpoint is written (simulated, and a real file-size limit), log.csv after a kill, and a malicious pickle in
a run directory. The crash mid-swap, a leftover state.tmp and a NaN loss are covered in test_trainer.py.

Tiny U-Nets on scikit-learn's digits, one CPU thread.
"""

from __future__ import annotations

import errno
import importlib.util
import io
import os
import pickle
import resource
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch

from noisecraft import cli
from noisecraft.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from noisecraft.errors import NoisecraftError
from noisecraft.io import checkpoint, csv_log
from noisecraft.io.checkpoint import existing_state_dir, load_json, load_torch, load_weights
from noisecraft.models.unet import UNetConfig
from noisecraft.training.state import weights_step
from noisecraft.training.trainer import LOG_HEADER, Trainer, resume_trainer

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"
CLI_ARGS = ["--dataset", "digits", "--batch-size", "16", "--base-channels", "16", "--channel-mults", "1,2",
            "--attention-levels", "", "--seed", "0", "--log-every", "1", "--sample-every", "0"]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("kill_resume", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = module       # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("kill_resume", None)


def make_config(steps: int, checkpoint_every: int = 2) -> RunConfig:
    model = UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(),
                       head_dim=8, groups=4)
    train = TrainConfig(batch_size=16, lr=2e-3, warmup_steps=2, ema_decay=0.9, steps=steps, sample_every=0,
                        checkpoint_every=checkpoint_every, log_every=1, seed=3)
    return RunConfig(model=model, diffusion=DiffusionConfig(schedule="cosine"), train=train,
                     data=DataConfig(dataset="digits", image_shape=(1, 16, 16),
                                     class_names=[str(i) for i in range(10)], conditional=False))


def file_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_steps(run: Path) -> list[int]:
    lines = (run / "log.csv").read_text().splitlines()
    assert lines[0].split(",") == LOG_HEADER
    return [int(line.split(",")[0]) for line in lines[1:]]


def is_one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and ". " not in msg


def assert_nothing_half_written(run: Path) -> None:
    assert not (run / "state.tmp").exists() and not (run / "state.old").exists()
    assert [p.name for p in run.rglob(".*")] == []          # atomic_write's temporary files are dot files


# ---------------------------------------------------------------- SIGKILL at random moments


def test_sigkill_at_random_moments_loses_at_most_one_interval_and_ends_bitwise_equal(harness, tmp_path):
    # Forked runs of the CLI (no interpreter start-up); kills 1 and 3 are aimed at parts of checkpoint writes.
    c = 4
    summary = harness.run_harness(tmp_path, kills=3, seed=0, checkpoint_every=c, fork=True, verbose=False)
    assert summary["problems"] == [] and summary["ok"]
    assert summary["kills"] == 3 and summary["kills_during_write"] >= 1
    assert 0 <= summary["max_lost"] <= c
    assert len(summary["bitwise_equal"]) == 4 and all(summary["bitwise_equal"].values())
    assert log_steps(tmp_path / "run") == list(range(1, summary["steps"] + 1))


# ---------------------------------------------------------------- a full disk while saving


def fail_writing(monkeypatch, run: Path, target: str, code: int) -> list:
    """Make the atomic write of run/target write half its bytes, then fail with OSError(code) as a full disk does;
    every other file is written normally. Returns the temporary files the failing writes used."""
    real_atomic_write, failed = checkpoint.atomic_write, []

    def atomic_write_bytes(path, data):
        if Path(path).relative_to(run).as_posix() != target:
            return real_atomic_write(path, lambda tmp: tmp.write_bytes(data))

        def half_then_full(tmp):
            with open(tmp, "wb") as f:
                f.write(data[:len(data) // 2])
            failed.append(tmp)
            raise OSError(code, os.strerror(code))
        return real_atomic_write(path, half_then_full)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", atomic_write_bytes)
    return failed


@pytest.mark.parametrize("target, code", [
    ("config.json", errno.ENOSPC),                   # the first file of a checkpoint
    ("state.tmp/model.safetensors", errno.ENOSPC),   # the first file of the new state
    ("state.tmp/optimizer.pt", errno.EDQUOT),        # a later one
    ("state.tmp/COMPLETE", errno.EIO),               # the last one
    ("model.safetensors", errno.EFBIG),              # the EMA weights, after the new state is in place
])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(few_digits, tmp_path, monkeypatch, target, code):
    run = tmp_path / "run"
    Trainer(make_config(steps=2), few_digits, run, progress=False).fit()
    state_before, ema_before = file_bytes(run / "state"), (run / "model.safetensors").read_bytes()

    trainer = resume_trainer(run, few_digits, progress=False, steps=4)
    failed = fail_writing(monkeypatch, run, target, code)
    with pytest.raises(NoisecraftError) as info:
        trainer.fit()                                 # the checkpoint of step 4 fails
    monkeypatch.undo()
    assert len(failed) == 1 and not failed[0].exists()

    msg = str(info.value)
    assert is_one_sentence(msg), msg
    assert f"({os.strerror(code)})" in msg and "step 4" in msg and f"continue with --resume {run}" in msg
    after_swap = target == "model.safetensors"
    if after_swap:
        # the new state is whole; model.safetensors is still the previous whole file, and the message says both
        assert "its training state is saved" in msg and "model.safetensors still holds the EMA weights of step 2" in msg
        assert load_json(run / "state" / "COMPLETE") == {"step": 4}
        load_weights(run / "state" / "model.safetensors"), load_torch(run / "state" / "optimizer.pt")
    else:
        assert "the previous checkpoint (step 2) is kept" in msg
        assert file_bytes(existing_state_dir(run / "state")) == state_before
    assert (run / "model.safetensors").read_bytes() == ema_before
    assert weights_step(run / "model.safetensors") == 2
    assert_nothing_half_written(run)

    # Once there is space again, --resume continues from what was kept and completes the checkpoint.
    resumed = resume_trainer(run, few_digits, progress=False, steps=4)
    assert resumed.step == (4 if after_swap else 2)
    resumed.fit()
    assert load_json(run / "state" / "COMPLETE") == {"step": 4} and weights_step(run / "model.safetensors") == 4
    assert log_steps(run) == [1, 2, 3, 4]


def test_a_full_disk_at_the_first_checkpoint_says_there_is_nothing_to_resume(few_digits, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fail_writing(monkeypatch, run, "state.tmp/ema.safetensors", errno.ENOSPC)
    with pytest.raises(NoisecraftError, match=r"step 2 .*\(No space left on device\) and it holds no earlier "
                                              r"checkpoint — free some space, delete .* and start again\.$"):
        Trainer(make_config(steps=2), few_digits, run, progress=False).fit()
    assert existing_state_dir(run / "state") is None
    assert_nothing_half_written(run)


def test_a_real_file_size_limit_ends_in_one_line_and_keeps_the_checkpoint(harness, tmp_path):
    # The OS refuses the write (EFBIG: RLIMIT_FSIZE, with SIGXFSZ ignored so the process lives to report it).
    run = tmp_path / "run"
    assert cli.main(["train", *CLI_ARGS, "--steps", "2", "--checkpoint-every", "2", "--out", str(run)]) == 0
    state_before, ema_before = file_bytes(run / "state"), (run / "model.safetensors").read_bytes()
    limit = 64 * 1024
    assert len(state_before["model.safetensors"]) > limit        # the weights no longer fit ...
    assert (run / "log.csv").stat().st_size < limit // 4 and (run / "config.json").stat().st_size < limit // 4

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # `noisecraft train --resume RUN --steps 4` in a forked child process (no interpreter start-up)
    child = harness.ForkedCommand([sys.executable, "-m", "noisecraft", "train", "--resume", str(run), "--steps", "4"],
                                  tmp_path / "output.txt", setup=limit_file_size)
    assert child.wait() == 2
    output = (tmp_path / "output.txt").read_text()
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == output.strip().splitlines()[-1]
    assert errors[0].startswith(f"noisecraft: error: could not write the checkpoint of step 4 to {run} "
                                f"({os.strerror(errno.EFBIG)}); the previous checkpoint (step 2) is kept")
    assert is_one_sentence(errors[0])
    # ... and the checkpoint of step 2 is untouched and loads.
    assert file_bytes(existing_state_dir(run / "state")) == state_before
    assert (run / "model.safetensors").read_bytes() == ema_before
    load_weights(run / "model.safetensors"), load_torch(run / "state" / "optimizer.pt")
    assert_nothing_half_written(run)
    assert log_steps(run) == [1, 2, 3, 4]      # the rows of the lost steps stay until a resume drops them


def test_a_full_disk_while_logging_is_a_clear_error(tmp_path, monkeypatch):
    class FullDisk(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(csv_log, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(NoisecraftError) as info:
        csv_log.append_row(tmp_path / "log.csv", LOG_HEADER, [1, 0.5, 1e-4, 100.0, 1.0])
    assert is_one_sentence(str(info.value)) and "No space left on device" in str(info.value)


# ---------------------------------------------------------------- log.csv after a kill


def test_resume_drops_log_rows_past_the_checkpoint_a_torn_line_and_leftover_files(few_digits, tmp_path):
    run = tmp_path / "run"
    Trainer(make_config(steps=4, checkpoint_every=4), few_digits, run, progress=False).fit()
    # What a kill during step 7 can leave: rows past the checkpoint, a torn row, temporary files of atomic writes.
    with open(run / "log.csv", "a", newline="") as f:
        f.write("5,0.5,0.002,100.0,1.0\r\n6,0.5,0.002,100.0,1.0\r\n7,0.4")
    junk = [run / ".model.k2j4x9_a.safetensors", run / ".config.0abcdefg.json", run / ".log.zzzzzzzz.csv",
            run / "state.tmp" / "ema.safetensors", run / "state.old" / "COMPLETE"]   # state.old: superseded
    for p in junk:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a file")
    keep = run / ".model.safetensors.notes"           # not a name atomic_write makes: left alone
    keep.write_text("mine")

    trainer = resume_trainer(run, few_digits, progress=False, steps=8)
    assert trainer.step == 4
    assert log_steps(run) == [1, 2, 3, 4] and (run / "log.csv").read_bytes().endswith(b"\n")
    assert not any(p.exists() for p in junk) and keep.exists()
    assert not (run / "state.tmp").exists() and not (run / "state.old").exists()
    trainer.fit()
    assert log_steps(run) == list(range(1, 9))


def test_truncate_log(tmp_path):
    path = tmp_path / "log.csv"
    assert csv_log.truncate_log(path, 3) is False and not path.exists()
    for step in (1, 2, 3):
        csv_log.append_row(path, LOG_HEADER, [step, 0.5, 1e-4, 100.0, 1.0])
    inode = path.stat().st_ino
    assert csv_log.truncate_log(path, 3) is False and path.stat().st_ino == inode    # nothing to drop: untouched
    with open(path, "a") as f:
        f.write("4,0.5\r\n5,0.5,0.0001,100.0,1.0\r\n")                                 # a row with missing fields
    assert csv_log.truncate_log(path, 9) is True and log_steps(tmp_path) == [1, 2, 3, 5]
    assert csv_log.truncate_log(path, 2) is True and log_steps(tmp_path) == [1, 2]
    path.write_text("step,lo")                                                        # a torn header
    assert csv_log.truncate_log(path, 2) is True and not path.exists()
    csv_log.append_row(path, LOG_HEADER, [3, 0.5, 1e-4, 100.0, 1.0])
    assert log_steps(tmp_path) == [3]


# ---------------------------------------------------------------- a malicious pickle in the run


class RunsCode:
    """Unpickling this calls fn(*args): what a hostile optimizer.pt would do."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_resume_refuses_a_malicious_pickle_without_running_it(few_digits, tmp_path, capsys, fmt):
    run = tmp_path / "run"
    Trainer(make_config(steps=2), few_digits, run, progress=False).fit()

    def payload(marker: Path) -> bytes:
        if fmt == "pickle":
            return pickle.dumps(RunsCode(os.system, (f"touch {shlex.quote(str(marker))}",)), protocol=2)
        buf = io.BytesIO()
        torch.save({"state": RunsCode(open, (str(marker), "w")), "param_groups": []}, buf)
        return buf.getvalue()

    # The payload is live: loading it without weights_only runs it.
    proof = tmp_path / "proof"
    data = payload(proof)
    pickle.loads(data) if fmt == "pickle" else torch.load(io.BytesIO(data), weights_only=False)
    assert proof.exists()

    marker = tmp_path / "pwned"
    (run / "state" / "optimizer.pt").write_bytes(payload(marker))
    before = file_bytes(run)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--steps", "3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("noisecraft: error: ") and is_one_sentence(err[0])
    assert "optimizer.pt" in err[0] and "refused" in err[0]
    assert not marker.exists()
    assert file_bytes(run) == before                   # nothing on disk changed
