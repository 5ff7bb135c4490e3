"""Distributed data-parallel training: torchrun with 2 CPU processes (gloo on 127.0.0.1) gives the weights of one
process with the same global batch and seed; a run resumes on a different number of processes; gradient
accumulation gives the same step as one big batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noisecraft.config import make_run_config
from noisecraft.data.datasets import load_dataset
from noisecraft.errors import NoisecraftError
from noisecraft.io.checkpoint import load_weights
from noisecraft.training.speed import SpeedOptions
from noisecraft.training.trainer import Trainer

TINY = ["--dataset", "digits", "--batch-size", "16", "--base-channels", "16", "--channel-mults", "1,2",
        "--attention-levels", "1", "--sample-every", "0", "--checkpoint-every", "0", "--log-every", "1",
        "--seed", "0", "--conditional", "--no-download"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.device_count() >= 2 else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args: list[str], nproc: int = 1, device: str = "cpu", ok: bool = True,
          preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "noisecraft", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "noisecraft", "train"]
    done = subprocess.run(cmd + args + ["--device", device], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    """float32: ranks sum their gradients in another order than one process (~1 ulp apart), so the weights agree
    to well under atol, not bit for bit (in-process accumulation below: 7e-9)."""
    for name in ("state/model.safetensors", "state/ema.safetensors", "model.safetensors"):
        wa, wb = load_weights(a / name), load_weights(b / name)
        assert wa.keys() == wb.keys()
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst <= atol, f"{name}: max difference {worst}"


def logged_steps(run: Path) -> list[int]:
    lines = (run / "log.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One process, 8 steps: the reference."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(TINY + ["--steps", "8", "--out", str(out)])
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_two_processes_give_the_weights_of_one(straight, tmp_path, device):
    out = tmp_path / "ddp"
    done = train(TINY + ["--steps", "8", "--out", str(out)], nproc=2, device=device)
    assert "2 processes" in done.stdout
    assert done.stdout.count("done:") == 1            # only rank 0 speaks
    assert_same_weights(out, straight)
    assert logged_steps(out) == list(range(1, 9))     # only rank 0 writes the log, once per step
    # the reported batch loss is the mean over the whole batch, as in one process
    ddp_loss = [float(r.split(",")[1]) for r in (out / "log.csv").read_text().splitlines()[1:]]
    one_loss = [float(r.split(",")[1]) for r in (straight / "log.csv").read_text().splitlines()[1:]]
    assert ddp_loss == pytest.approx(one_loss, rel=1e-5)   # float32 sums in another order, logged to 6 decimals


def test_two_nodes_meeting_through_c10d_rendezvous_give_the_weights_of_one(straight, tmp_path):
    """Multi-node as torchrun does it, on one host: two agents (--nnodes 2, one process each) find each other
    through the c10d rendezvous on 127.0.0.1 and share the run folder (a shared file system)."""
    out, port = tmp_path / "two-nodes", free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
           "-m", "noisecraft", "train", *TINY, "--steps", "8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(o.count("done:") for o, _ in outputs) == 1
    assert_same_weights(out, straight)


def test_resume_on_a_different_number_of_processes(straight, tmp_path):
    out = tmp_path / "run"
    train(TINY + ["--steps", "4", "--out", str(out)], nproc=2)
    done = train(["--resume", str(out), "--steps", "8", "--data-dir", os.environ.get("NOISECRAFT_DATA", "")])
    assert "resuming" in done.stdout and "at step 4" in done.stdout
    assert_same_weights(out, straight)


def test_two_processes_with_accumulation_and_a_time_budget_stop_together(tmp_path):
    """A wall-clock budget is rank 0's clock: both processes stop after the same step (no hang)."""
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--conditional"]
    train(args + ["--steps", "100000", "--minutes", "0.03", "--accumulate", "2", "--out", str(out)], nproc=2)
    steps = json.loads((out / "state" / "trainer.json").read_text())["step"]
    assert 0 < steps < 100000
    assert logged_steps(out) == list(range(1, steps + 1))


def test_a_diverging_loss_stops_every_process_and_keeps_the_checkpoint(tmp_path):
    """The loss is all-reduced before the optimizer step, so all ranks see the same inf and stop together."""
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--conditional"]
    done = train(args + ["--steps", "20", "--lr", "1e30", "--checkpoint-every", "1", "--out", str(out)], nproc=2,
                 ok=False)
    assert "the loss became inf at step 2" in done.stderr
    assert done.stderr.count("noisecraft: error:") == 2          # both ranks, one line each
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 1
    assert logged_steps(out) == [1]


def limit_file_size():
    """In the child: files may not grow past 64 KiB (a full disk, as the OS reports it), and writing past the
    limit fails with EFBIG instead of killing the process."""
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_failed_checkpoint_write_on_rank_0_stops_every_process(tmp_path):
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--conditional"]
    done = train(args + ["--steps", "6", "--checkpoint-every", "2", "--out", str(out)], nproc=2, ok=False,
                 preexec=limit_file_size)
    assert "could not write the checkpoint" in done.stderr              # rank 0: what happened
    assert "rank 0 could not write the checkpoint for step 2" in done.stderr   # rank 1: why it stops
    assert not (out / "state").exists() and not (out / "state.tmp").exists()


# --- in one process ------------------------------------------------------------------------------------

def tiny_config(diffusion=None, **train):
    data = load_dataset("digits").subset(256)
    model = dict(base_channels=16, channel_mults=(1, 2), attention_levels=(1,))
    config = make_run_config(data, True, model, diffusion or {}, dict(batch_size=12, steps=3, sample_every=0,
                                                          checkpoint_every=0, **train))
    return config, data


@pytest.mark.parametrize("diffusion", [{}, {"learn_sigma": True, "loss": "hybrid"}])
def test_accumulation_gives_the_step_of_one_big_batch(tmp_path, diffusion):
    config, data = tiny_config(diffusion)
    weights = []
    for k in (1, 3, 12):
        trainer = Trainer(config, data, tmp_path / f"k{k}", progress=False, accumulate=k)
        losses = [trainer.train_step() for _ in range(3)]
        weights.append((losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (loss1, w1) = weights[0]
    for losses, w in weights[1:]:
        # float32: micro-batch gradients summed in another order; 7e-9 seen on weights that 3 AdamW steps of lr 2e-3
        # move by up to ~6e-3
        assert losses == pytest.approx(loss1, rel=1e-5)
        assert max((w[n] - w1[n]).abs().max().item() for n in w1) < 1e-6


def test_speed_options_train_and_bad_ones_are_refused(tmp_path):
    config, data = tiny_config()
    ref = Trainer(config, data, tmp_path / "ref", progress=False)
    ref_loss = [ref.train_step() for _ in range(2)]
    for adam in ("fused", "loop"):      # other AdamW kernels: the same update to rounding
        other = Trainer(config, data, tmp_path / adam, progress=False, speed=SpeedOptions(adam=adam))
        assert [other.train_step() for _ in range(2)] == pytest.approx(ref_loss, rel=1e-5)
    bf16 = Trainer(config, data, tmp_path / "bf16", progress=False, speed=SpeedOptions(precision="bf16"))
    loss = [bf16.train_step() for _ in range(2)]
    assert loss == pytest.approx(ref_loss, rel=0.05)          # bf16 keeps ~3 significant digits
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())   # master weights stay fp32
    with pytest.raises(NoisecraftError, match="fp16 training needs a GPU"):
        Trainer(config, data, tmp_path / "fp16", progress=False, speed=SpeedOptions(precision="fp16"))
    with pytest.raises(NoisecraftError, match="unknown precision"):
        SpeedOptions(precision="fp8")
    with pytest.raises(NoisecraftError, match="cannot be split"):
        Trainer(config, data, tmp_path / "acc", progress=False, accumulate=13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_a_gpu(tmp_path, precision):
    config, data = tiny_config()
    ref = Trainer(config, data, tmp_path / "ref", device="cuda", progress=False)
    ref_loss = [ref.train_step() for _ in range(3)]
    amp = Trainer(config, data, tmp_path / precision, device="cuda", progress=False,
                  speed=SpeedOptions(precision=precision))
    assert [amp.train_step() for _ in range(3)] == pytest.approx(ref_loss, rel=0.05)
    assert all(p.dtype == torch.float32 for p in amp.model.parameters())


def test_grad_scaler_clips_unscaled_gradients_and_skips_overflowing_steps():
    """The fp16 path's bookkeeping, checked on CPU: the loss is scaled by 2^16 before backward, yet clipping and the
    step see the true gradients (the same update as without scaling); a step with inf gradients is skipped and the
    scale halves."""
    torch.manual_seed(0)
    x, target = torch.randn(32, 4), torch.randn(32, 2)
    updates = []
    for scaled in (False, True):
        torch.manual_seed(1)
        net = torch.nn.Linear(4, 2)
        options = SpeedOptions(precision="fp32")
        if scaled:
            options.use_grad_scaler("cpu")
        optimizer = options.optimizer(net.parameters(), lr=0.1, weight_decay=0.0)
        options.backward((net(x) - target).pow(2).mean() * 100)      # large: clipping at 1 is active
        options.step(optimizer, net.parameters(), grad_clip=1.0)
        updates.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-5, atol=1e-6)   # float32: ×2^16 is exact; ~1 ulp

    net = torch.nn.Linear(4, 2)
    options = SpeedOptions(precision="fp32")
    options.use_grad_scaler("cpu")
    optimizer = options.optimizer(net.parameters(), lr=0.1, weight_decay=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    options.backward(net(x).sum() * float("inf"))
    options.step(optimizer, net.parameters(), grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))    # skipped
    assert options._scaler.get_scale() == 2.0 ** 15
