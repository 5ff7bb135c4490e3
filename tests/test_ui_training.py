"""Training from the UI (ui/training.py): a real `noisecraft train` subprocess on the bundled digits, watched through
its log.csv and sample grids, stopped with SIGINT (it saves a checkpoint first) and resumed."""

from __future__ import annotations

import os

import pytest

from noisecraft.errors import NoisecraftError
from noisecraft.training.state import checkpoint_step
from noisecraft.ui import training
from noisecraft.ui.training import TrainingJob, thread_split, wait_until

SMALL = ["--base-channels", "8", "--channel-mults", "1,2", "--batch-size", "16", "--checkpoint-every", "0"]


def test_thread_split_never_exceeds_the_cores():
    assert thread_split(cores=2) == (1, 1)
    assert thread_split(cores=1) == (1, 1)
    assert thread_split(cores=16) == (8, 8) and thread_split(cores=3) == (2, 1)
    assert thread_split(4, cores=16) == (12, 4)
    assert thread_split(99, cores=8) == (1, 7)
    for cores in range(2, 9):
        for wanted in (None, 1, 3, 50):
            server, trainer = thread_split(wanted, cores=cores)
            assert server >= 1 and trainer >= 1 and server + trainer <= cores
    with pytest.raises(NoisecraftError):
        thread_split(0, cores=4)


def test_start_refuses_bad_requests(tmp_path):
    with pytest.raises(NoisecraftError, match="unknown model kind"):
        TrainingJob.start("digits", "gan", 1, tmp_path / "a")
    with pytest.raises(NoisecraftError, match="budget"):
        TrainingJob.start("digits", "unconditional", None, tmp_path / "a")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(NoisecraftError, match="already holds a run"):
        TrainingJob.start("digits", "unconditional", 1, tmp_path / "old")
    with pytest.raises(NoisecraftError, match="no checkpoint"):
        TrainingJob.get(tmp_path / "nothing").resume(1)
    assert TrainingJob.get(tmp_path / "nothing").status()["state"] == "idle"


def test_start_watch_stop_resume(tmp_path):
    run = tmp_path / "runs" / "digits"
    job = TrainingJob.start("digits", "unconditional", None, run, threads=1, steps=2000, sample_every=10, log_every=5,
                            extra_args=SMALL, set_server_threads=False)
    try:
        assert TrainingJob.get(str(run) + "/") is job          # every tab sees the same job
        assert job in TrainingJob.all()
        assert "1 thread" in job.status()["threads"]
        # the loss curve grows and sample grids appear while it runs
        assert wait_until(lambda: len(job.status()["steps"]) >= 3 and job.status()["grid"], 240), job.status()
        first = job.status()
        assert first["state"] == "running" and first["steps"] == sorted(first["steps"])
        assert all(s % 5 == 0 for s in first["steps"]) and len(first["losses"]) == len(first["steps"])
        assert first["grid"].endswith(".png") and os.path.isfile(first["grid"])
        with pytest.raises(NoisecraftError, match="already training"):
            job.resume(1)

        stopped = job.stop(timeout=120)                    # SIGINT: the trainer saves a checkpoint, then exits
        assert stopped["state"] == "stopped", stopped
        assert (run / "state" / "COMPLETE").exists() and (run / "model.safetensors").exists()
        saved = checkpoint_step(run)
        logged = stopped["step"]
        assert logged <= saved < 2000                     # the checkpoint is at the step it was stopped at
        assert "interrupted: saving a checkpoint" in (run / training.OUTPUT_LOG).read_text()

        # resume up to 40 steps past the last logged one
        job.resume(None, steps=logged + 40, log_every=5, threads=1, set_server_threads=False)
        done = job.wait(240)
        assert done["state"] == "finished", done
        assert done["step"] == logged + 40 and len(done["steps"]) > len(stopped["steps"])
        assert done["steps"] == sorted(done["steps"])
        assert training.loss_figure(run).width > 100
        # a fresh registry entry (another server, a restart) reads the run from its files
        other = TrainingJob(run)
        assert other.status()["state"] == "stopped" and other.status()["step"] == logged + 40
    finally:
        if job.running:
            job.process.kill()
            job.process.wait()


def test_run_names_are_confined_and_runs_are_listed(tmp_path):
    from noisecraft.ui.training import list_runs, run_folder, status_text
    assert run_folder(tmp_path, "digits-2") == tmp_path.resolve() / "digits-2"
    for bad in ("../x", "/etc", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(NoisecraftError, match="one folder name"):
            run_folder(tmp_path, bad)
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "log.csv").write_text("step,loss,lr,images_per_s,elapsed_s\n5,0.5,1e-3,100,1\n10,0.4,1e-3,100,2\n12,")
    assert str(run.resolve()) in list_runs([tmp_path / "runs"])
    status = TrainingJob.get(run).status()
    assert (status["steps"], status["losses"], status["state"]) == ([5, 10], [0.5, 0.4], "idle")
    assert "step 10, loss 0.4000" in status_text(status)
    assert training.loss_figure(run).height > 100


def test_train_tab_builds(tmp_path):
    gr = pytest.importorskip("gradio")
    from noisecraft.ui.library import ModelLibrary
    with gr.Blocks():
        training.build_tab(ModelLibrary([tmp_path]), threads=1)
