"""MNIST test-set likelihood in bits/dim of what 30 CPU minutes can train: a DDPM (ε-prediction, fixed variance,
the `noisecraft train` defaults) measured by its variational bound and by the probability-flow ODE, and a VDM
(learned noise schedule, continuous-time bound).

    python benchmarks/likelihood.py train --minutes 30 --threads 1     # both models, one after the other
    python benchmarks/likelihood.py eval --n 1000 --ode-n 100          # the numbers -> results/likelihood_mnist.json

Everything goes through the command line a user would type (noisecraft train / train-vdm / eval / eval-vdm), so the
commands printed here are the protocol. Runs live in benchmarks/out/nll/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "out" / "nll"
RESULTS = HERE / "results" / "likelihood_mnist.json"


def noisecraft(args: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$ noisecraft " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "noisecraft", *args], check=True, env=env, capture_output=True,
                         text=True).stdout
    print(out.strip().splitlines()[-1] if out.strip() else "", f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["train", "eval"])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=1000, help="test images for the bounds")
    p.add_argument("--nll-steps", type=int, default=20, help="timesteps per image for the DDPM bound estimate")
    p.add_argument("--ode-n", type=int, default=100, help="test images for the ODE likelihood")
    args = p.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.part == "train":
        noisecraft(["train", "--dataset", "mnist", "--out", str(RUNS / "eps"), "--minutes", str(args.minutes)],
                   args.threads)
        noisecraft(["train-vdm", "--dataset", "mnist", "--out", str(RUNS / "vdm"), "--minutes", str(args.minutes)],
                   args.threads)
        return 0
    result = {}
    noisecraft(["eval", str(RUNS / "eps"), "--nll", "--n", str(args.n), "--nll-steps", str(args.nll_steps)],
               args.threads)
    result["ddpm_bound"] = json.loads((RUNS / "eps" / "eval.json").read_text())["nll_bound"]
    noisecraft(["eval", str(RUNS / "eps"), "--ode", "--n", str(args.ode_n), "--batch-size", str(args.ode_n)],
               args.threads)
    result["ddpm_ode"] = json.loads((RUNS / "eps" / "eval.json").read_text())["nll_ode"]
    result["vdm_bound"] = noisecraft(["eval-vdm", str(RUNS / "vdm"), "--split", "test", "--n", str(args.n)],
                                     args.threads).strip().splitlines()[-1]
    result["ddpm_bound"].pop("terms", None)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
