"""Kill `noisecraft train` with SIGKILL at random moments, resume it each time, and check that no work is lost.

    python benchmarks/kill_resume.py                  # 20 kills, about half of them during a checkpoint write
    python benchmarks/kill_resume.py --kills 5 --seed 1 --save
    python benchmarks/kill_resume.py --shards --checkpoint-every 1     # streamed from tar shards, 2 data workers

A tiny U-Net trains on scikit-learn's digits in a subprocess (one thread). Kills alternate between two kinds:
"write" kills pick a part of a checkpoint write at random (the temporary file of config.json, of each file of
state.tmp, the swap through state.old, the EMA model.safetensors; the run folder is polled every 0.2 ms) and strike
within 0.5 ms of seeing it; "random" kills strike a random number of steps (1..2C) plus a random fraction of a step
after the resume point. Whether a write was in progress is read from what is on disk once the process is dead.
After every kill:

  * every checkpoint on disk loads: the resumable state (state/, or state.old after a kill mid-swap: weights,
    EMA, optimizer, RNG, step) into a fresh U-Net, and model.safetensors;
  * nothing is lost beyond the last checkpoint: the resumable step never goes down, is at least every step the
    harness saw reported complete (state/COMPLETE), and at least the last multiple of C strictly below the last
    step in log.csv (so at most one checkpoint interval of work is lost);
  * log.csv holds steps 1..L, each exactly once (earlier resumes dropped the rows past their checkpoint).

Then the run is resumed with --resume. The same training also runs uninterrupted into another folder (first: its
step time sets the random kills' delays), and at the end state/model.safetensors, state/ema.safetensors,
state/optimizer.pt and model.safetensors of both runs must be equal bit for bit (torch.equal on every tensor),
log.csv must hold steps 1..S once each, and no temporary file may be left in the run folder. Exits with status 1
if any check fails; --save writes the summary to benchmarks/results/kill_resume.json.

--shards streams the same digits from tar shards written into OUT/shards (`noisecraft train --data`, with --workers
data-loading processes, which die with the killed trainer): the resumed run reopens the stream at sample
step·batch_size, so it must end bit for bit equal to the uninterrupted one as well. The granularity is the
checkpoint: a kill loses the steps since the last one (with --checkpoint-every 1, at most the step in flight).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from noisecraft.config import load_run_config
from noisecraft.io.checkpoint import existing_state_dir, load_json, load_torch, load_weights
from noisecraft.models.unet import UNet
from noisecraft.training.state import weights_step

MODEL_ARGS = ["--dataset", "digits", "--batch-size", "16", "--base-channels", "16", "--channel-mults", "1,2",
              "--attention-levels", "", "--seed", "0", "--log-every", "1", "--sample-every", "0"]
# what an interrupted checkpoint leaves in the run folder: the state being written, the state moved aside during
# the swap, and the temporary files of atomic_write (".<stem>.<8 random characters><suffix>")
TEMP_FILE = re.compile(r"\.(config|model)\.[a-z0-9_]{8}\.(json|safetensors)")
RUN_FILES = {"config.json", "model.safetensors", "state", "log.csv"}
# the parts of a checkpoint write that "write" kills aim at, in the order they happen: the temporary file of
# config.json, of each file of state.tmp, the swap of state.tmp into place (state.old), the EMA model.safetensors
WRITE_PHASES = ("config.json", "state.tmp/model", "state.tmp/ema", "state.tmp/optimizer", "state.tmp/rng", "swap",
                "model.safetensors")


@dataclass
class Kill:
    """One SIGKILL and what was on disk afterwards."""
    index: int
    kind: str                    # "write" (aimed at a checkpoint write) or "random"
    aim: str                     # the part of the write a "write" kill waited for (WRITE_PHASES), or "-"
    resumed_from: int            # the step the killed process started at
    log_step: int                # last complete step in log.csv when it died
    during_write: bool           # a checkpoint write was in progress (its files were on disk after the kill)
    phase: str                   # which part of the write, e.g. "state.tmp (ema, model; writing optimizer)" or "-"
    resumable: int               # the step --resume continues from
    lost: int                    # log_step - resumable: steps trained again
    ema_step: int | None         # the step of model.safetensors
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ reading the run folder


def checkpoint_artifacts(run: Path) -> list[str]:
    """Names in the run folder that exist only while a checkpoint is being written."""
    try:
        names = os.listdir(run)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n in ("state.tmp", "state.old") or TEMP_FILE.fullmatch(n))


def describe_write(run: Path, artifacts: list[str]) -> str:
    """Which part of a checkpoint was being written, from the files it left."""
    parts = []
    for name in artifacts:
        if name == "state.tmp":
            inside = sorted(p.name for p in (run / name).iterdir()) if (run / name).is_dir() else []
            done = [n.split(".")[0] for n in inside if not n.startswith(".")]
            writing = [n.split(".")[1] for n in inside if n.startswith(".")]
            busy = f"; writing {', '.join(writing)}" if writing else ""
            parts.append(f"state.tmp ({', '.join(done) or 'empty'}{busy})")
        elif name == "state.old":
            parts.append("swap (state.old)")
        else:
            parts.append(f"{name.split('.')[1]}.{name.rsplit('.', 1)[1]} temp")
    return " + ".join(parts) or "-"


def read_log_column(run: Path, name: str) -> list[str]:
    """One column of log.csv (complete rows)."""
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    i = rows[0].index(name)
    return [r[i] for r in rows[1:]]


def read_log_steps(run: Path) -> tuple[list[int], bool]:
    """The steps of the complete rows of log.csv, and whether its last line is torn."""
    try:
        text = (run / "log.csv").read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], False
    lines = text.splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith("\n")
    steps = []
    for line in lines[1:]:
        if line.endswith("\n"):
            steps.append(int(line.split(",", 1)[0]))
    return steps, torn


class Watcher:
    """Cheap polling of a live run: the last step logged by the current process and the highest step whose
    checkpoint was seen complete on disk."""

    def __init__(self, run: Path, previous_last_step: int):
        self.run, self.previous = run, previous_last_step
        self.start_inode = self._inode(run / "log.csv")
        self._size, self._state_inode = -1, None
        self.step = 0                    # last step logged by this process (0 until it logs one)
        self.complete = 0                # highest step seen in state/COMPLETE

    @staticmethod
    def _inode(path: Path) -> int | None:
        try:
            return os.stat(path).st_ino
        except FileNotFoundError:
            return None

    def refresh(self) -> None:
        try:
            st = os.stat(self.run / "log.csv")
        except FileNotFoundError:
            st = None
        if st is not None and st.st_size != self._size:
            self._size = st.st_size
            with open(self.run / "log.csv", "rb") as f:
                f.seek(max(0, st.st_size - 256))
                tail = f.read().decode("utf-8", errors="replace")
            rows = [r for r in tail.split("\n")[:-1] if r[:1].isdigit()]   # complete rows only
            if rows:
                last = int(rows[-1].split(",", 1)[0])
                # rows of the killed process stay until the new one truncates the log (a new file): ignore them
                if st.st_ino != self.start_inode or last > self.previous:
                    self.step = last
        ino = self._inode(self.run / "state")
        if ino is not None and ino != self._state_inode:
            try:
                self.complete = max(self.complete, int(load_json(self.run / "state" / "COMPLETE")["step"]))
                self._state_inode = ino
            except Exception:   # the swap is under way; look again next time
                pass


def check_checkpoints(run: Path, checkpoint_every: int) -> tuple[int, int | None, list[str]]:
    """Load every checkpoint on disk; return (resumable step, step of model.safetensors, problems)."""
    problems = []
    config = load_run_config(run)
    model = UNet(config.model)
    state = existing_state_dir(run / "state")
    if state is None:
        return 0, None, ["no complete training state on disk"]
    step = int(load_json(state / "COMPLETE")["step"])
    if int(load_json(state / "trainer.json")["step"]) != step:
        problems.append(f"{state.name}/trainer.json and COMPLETE disagree")
    try:
        model.load_state_dict(load_weights(state / "model.safetensors"))
        model.load_state_dict(load_weights(state / "ema.safetensors"))
        optimizer = load_torch(state / "optimizer.pt")
        assert set(optimizer) == {"state", "param_groups"}, "optimizer.pt is not an optimizer state"
        rng = load_weights(state / "rng.safetensors")
        torch.Generator().set_state(rng["generator"])
    except Exception as e:
        problems.append(f"{state.name} does not load: {e}")
    ema_step = None
    if (run / "model.safetensors").exists():
        try:
            model.load_state_dict(load_weights(run / "model.safetensors"))
            ema_step = weights_step(run / "model.safetensors")
            if ema_step is None or not step - checkpoint_every <= ema_step <= step:
                problems.append(f"model.safetensors holds step {ema_step}, the state step {step}")
        except Exception as e:
            problems.append(f"model.safetensors does not load: {e}")
    elif step > checkpoint_every:
        problems.append("model.safetensors is missing")
    return step, ema_step, problems


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        opt = load_torch(path)
        return {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
    return load_weights(path)


def same_tensors(a: Path, b: Path) -> bool:
    x, y = tensors_of(a), tensors_of(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------ running and killing


def train_command(run: Path, steps: int, checkpoint_every: int, resume: bool, shards: Path | None = None,
                  workers: int = 1) -> list[str]:
    """The training command; with `shards`, streamed from that shard folder by `workers` processes."""
    base = [sys.executable, "-m", "noisecraft", "train", "--steps", str(steps)]
    streamed = ["--workers", str(workers)] if shards is not None else []
    if resume:
        return base + ["--resume", str(run)] + streamed
    model = MODEL_ARGS if shards is None else ["--data", str(shards)] + MODEL_ARGS[2:]    # not --dataset digits
    return base + model + streamed + ["--checkpoint-every", str(checkpoint_every), "--out", str(run)]


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(cmd: list[str], log_path: Path, fork: bool = False):
    """Start a training command on one thread, its output going to log_path (a Popen, or a ForkedCommand)."""
    if fork:
        return ForkedCommand(cmd, log_path)
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})


def run_to_end(cmd: list[str], log_path: Path, here: bool = False) -> int:
    """Run a training command to its end and return its exit status; here=True calls the CLI in this process."""
    if not here:
        return launch(cmd, log_path).wait()
    from noisecraft.cli import main
    return main(cmd[cmd.index("noisecraft") + 1:])


class ForkedCommand:
    """`python -m noisecraft ARGS` run in a forked copy of this process, which has already imported torch and
    noisecraft: the same code path without 4-5 s of interpreter start-up, for the tests. Offers the part of
    Popen's interface the harness uses (pid, poll, wait, returncode)."""

    def __init__(self, cmd: list[str], log_path: Path, setup=None):
        """setup: called in the child before the command runs (e.g. to set resource limits)."""
        from noisecraft.cli import main
        argv = cmd[cmd.index("noisecraft") + 1:]
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:                                  # the child: never returns
            code = 1
            try:
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                sys.stdout = sys.stderr = open(1, "w", closefd=False)
                torch.set_num_threads(1)
                if setup is not None:
                    setup()
                code = main(argv)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(log_fd)
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def poll_until(proc: subprocess.Popen, watcher: Watcher, done, poll_s: float) -> bool:
    """Poll until done() is true (True) or the process ends (False)."""
    while proc.poll() is None:
        watcher.refresh()
        if done():
            return True
        time.sleep(poll_s)
    return False


def writing_now(run: Path) -> set[str]:
    """The parts of a checkpoint write visible on disk right now (see WRITE_PHASES)."""
    now = set()
    for name in checkpoint_artifacts(run):
        if name == "state.tmp":
            try:
                now |= {f"state.tmp/{n.split('.')[1]}" for n in os.listdir(run / name) if n.startswith(".")}
            except FileNotFoundError:
                pass
        elif name == "state.old":
            now.add("swap")
        else:
            now.add("config.json" if name.startswith(".config.") else "model.safetensors")
    return now


def run_until_killed(proc, run: Path, watcher: Watcher, kind: str, resumed_from: int, checkpoint_every: int,
                     steps: int, rng: random.Random, step_s: float, poll_s: float) -> tuple[bool, str]:
    """Kill `proc` at a moment of the given kind; returns (whether it was killed before it finished, the aim)."""
    c = checkpoint_every
    if kind == "write":
        # a part of the write of the checkpoint one or two intervals on; never the first checkpoint of a new run
        # (a kill there leaves nothing to resume from), nor the last (the run would end first)
        aim = rng.choice(WRITE_PHASES)
        last = (steps - 1) // c * c
        target = min(max((resumed_from // c + rng.randint(1, 2)) * c, 2 * c), last)
        for attempt in range(3):
            if not poll_until(proc, watcher, lambda: watcher.step >= target, poll_s):
                return False, aim
            # step target + 1 is logged only once the checkpoint of step `target` is written: then it was missed
            if not poll_until(proc, watcher, lambda: aim in writing_now(run) or watcher.step > target, poll_s):
                return False, aim
            if watcher.step <= target or target + c > last or attempt == 2:
                break
            target += c                       # too quick to catch this time: aim at the next checkpoint
        delay = rng.uniform(0.0, 0.0005)
    else:
        aim = "-"
        target = min(max(resumed_from + rng.randint(1, 2 * c), c + 1), steps - 1)
        if not poll_until(proc, watcher, lambda: watcher.step >= target, poll_s):
            return False, aim
        delay = rng.uniform(0.0, step_s)
    time.sleep(delay)
    if proc.poll() is not None:
        return False, aim
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True, aim


def run_harness(out: Path, *, kills: int = 20, seed: int = 0, steps: int | None = None, checkpoint_every: int = 10,
                poll_ms: float = 0.2, verbose: bool = True, fork: bool = False, shards: bool = False,
                workers: int = 1) -> dict:
    """Train into out/straight without interruption, then into out/run with `kills` SIGKILLs and resumes; return
    the summary (see the module docstring). `steps` defaults to (kills + 2)·C; a kill is never aimed past the end.
    fork: run the commands in forked copies of this process (for the tests). shards: stream the digits from tar
    shards written into out/shards, decoded by `workers` processes."""
    c = checkpoint_every
    data = None
    if shards:
        from noisecraft.data.shards import write_shards
        data = out / "shards"
        if not (data / "manifest.json").is_file():
            write_shards("digits", data, shard_size=250, overwrite=True)
    command = lambda path, resume: train_command(path, steps, c, resume, data, workers)
    steps = steps or (kills + 2) * c
    rng = random.Random(seed)
    run, logs = out / "run", out / "logs"
    for p in (run, out / "straight", logs):
        shutil.rmtree(p, ignore_errors=True)
    logs.mkdir(parents=True)
    say = print if verbose else (lambda *a, **k: None)
    records: list[Kill] = []
    problems: list[str] = []
    # the reference first: the same training without interruption (with fork=True it runs in this process, which
    # then holds everything the forked runs share: imports, the dataset)
    ref, t0 = out / "straight", time.perf_counter()
    if run_to_end(command(ref, False), logs / "straight.txt", here=fork) != 0:
        problems.append(f"the uninterrupted run failed; see {logs / 'straight.txt'}")
        return {"ok": False, "problems": problems}
    straight_s, t0 = time.perf_counter() - t0, time.perf_counter()
    step_s = float(read_log_column(ref, "elapsed_s")[-1]) / steps     # training time per step, checkpoints included
    say(f"uninterrupted run: {straight_s:.1f} s, {1e3 * step_s:.0f} ms per step (checkpoints included)")
    resumable, last_step, invocation = 0, 0, 0
    while len(records) < kills:
        kind = "write" if len(records) % 2 == 0 else "random"
        resume = resumable > 0
        proc = launch(command(run, resume), logs / f"{invocation:02d}.txt", fork)
        invocation += 1
        watcher = Watcher(run, last_step if resume else 0)
        killed, aim = run_until_killed(proc, run, watcher, kind, resumable, c, steps, rng, step_s, poll_ms / 1e3)
        if not killed:
            if proc.wait() != 0:
                problems.append(f"invocation {invocation - 1} failed (exit {proc.returncode}); see {logs}")
            say(f"the run reached step {steps} before kill {len(records) + 1}; raise --steps for more kills")
            break
        artifacts = checkpoint_artifacts(run)
        phase = describe_write(run, artifacts)
        log_steps, torn = read_log_steps(run)
        log_step = log_steps[-1] if log_steps else 0
        step, ema_step, found = check_checkpoints(run, c)
        floor = c * ((log_step - 1) // c) if log_step else 0
        if log_steps != list(range(1, log_step + 1)):
            found.append(f"log.csv steps are not 1..{log_step} once each")
        if step < resumable:
            found.append(f"the resumable step went down from {resumable} to {step}")
        if step < watcher.complete:
            found.append(f"the checkpoint of step {watcher.complete} was seen complete, then lost")
        if not floor <= step <= log_step:
            found.append(f"resumable step {step} is not within [{floor}, {log_step}] (last logged step {log_step})")
        rec = Kill(len(records) + 1, kind, aim, resumable, log_step, bool(artifacts), phase, step, log_step - step,
                   ema_step, found)
        records.append(rec)
        problems += [f"kill {rec.index}: {p}" for p in found]
        say(f"kill {rec.index:2d} {kind:6s} {aim:19s} at step {log_step:4d}{' (torn log line)' if torn else ''}: "
            f"{'WRITE ' + phase if rec.during_write else 'no write on disk'}; resumes at {step}, lost {rec.lost}"
            + (f"  PROBLEMS: {found}" if found else ""))
        if step == 0:            # nothing to resume (reported above): start again so the other checks go on
            shutil.rmtree(run)
        resumable, last_step = step, log_step
    # finish the interrupted run and compare it with the uninterrupted one
    if launch(command(run, resumable > 0), logs / "final.txt", fork).wait() != 0:
        problems.append(f"the final resume failed; see {logs / 'final.txt'}")
    interrupted_s = time.perf_counter() - t0
    equal = {}
    if not problems:
        for name in ("state/model.safetensors", "state/ema.safetensors", "state/optimizer.pt", "model.safetensors"):
            equal[name] = same_tensors(run / name, ref / name)
            if not equal[name]:
                problems.append(f"{name} differs from the uninterrupted run")
    final_steps, torn = read_log_steps(run)
    if final_steps != list(range(1, steps + 1)) or torn:
        problems.append(f"the final log.csv does not hold steps 1..{steps} once each")
    leftovers = sorted(set(os.listdir(run)) - RUN_FILES) if run.exists() else []
    if leftovers:
        problems.append(f"files left in the run folder: {leftovers}")
    during = sum(r.during_write for r in records)
    if len(records) >= 2 and during == 0:
        problems.append("no kill landed during a checkpoint write")
    phases = {}
    for r in records:
        for part in r.phase.split(" + ") if r.during_write else ():
            name = part.split(" (")[0]
            phases[name] = phases.get(name, 0) + 1
    lost = [r.lost for r in records]
    return {
        "kills": len(records), "kills_during_write": during, "write_phases": phases,
        "steps": steps, "checkpoint_every": c, "seed": seed, "shards": shards, "step_ms": round(1e3 * step_s, 1),
        "lost_per_kill": lost, "max_lost": max(lost, default=0), "mean_lost": sum(lost) / max(len(lost), 1),
        "bitwise_equal": equal, "problems": problems, "ok": not problems and len(records) == kills,
        "seconds_interrupted": round(interrupted_s, 1), "seconds_straight": round(straight_s, 1),
        "invocations": invocation + 2, "records": [asdict(r) for r in records],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="target step (default (kills + 2)·C)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="C")
    p.add_argument("--out", default="benchmarks/out/kill_resume")
    p.add_argument("--shards", action="store_true", help="stream the digits from tar shards (noisecraft train --data)")
    p.add_argument("--workers", type=int, default=2, help="with --shards: data-loading processes")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/kill_resume.json "
                                                       "(kill_resume_shards.json with --shards)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    s = run_harness(Path(args.out), kills=args.kills, seed=args.seed, steps=args.steps,
                    checkpoint_every=args.checkpoint_every, shards=args.shards, workers=args.workers)
    s["wall_s"] = round(time.perf_counter() - t0, 1)
    if "kills" not in s:
        print("FAILED" + "".join(f"\n  {p}" for p in s["problems"]))
        return 1
    print(f"\n{s['kills']} kills ({s['kills_during_write']} during a checkpoint write), {s['steps']} steps, "
          f"checkpoint every {s['checkpoint_every']}: steps lost per kill {s['lost_per_kill']}, max {s['max_lost']} "
          f"(bound {s['checkpoint_every']}), mean {s['mean_lost']:.1f}")
    print("kills during a write, by what was on disk: "
          + (", ".join(f"{k} {v}" for k, v in s["write_phases"].items()) or "none"))
    print("bit-for-bit equal to the uninterrupted run: "
          + (", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in s["bitwise_equal"].items()) or "not compared"))
    print(f"{'OK' if s['ok'] else 'FAILED'} in {s['wall_s']} s" + "".join(f"\n  {p}" for p in s["problems"]))
    if args.save:
        path = Path(__file__).parent / "results" / ("kill_resume_shards.json" if args.shards else "kill_resume.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(s, indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
