"""Streaming training from tar shards (`noisecraft train --data`): peak memory against the dataset's size, and
training speed against the in-memory path.

    python benchmarks/stream_data.py                       # both parts, ≈ 5 minutes on 2 idle cores
    python benchmarks/stream_data.py --part rss --sizes 10000,200000 --save
    python benchmarks/stream_data.py --part speed --cifar-images 10000 --rounds 3 --save
    python benchmarks/stream_data.py --part latent --latent-images 5000 --rounds 3 --save

Peak memory (--part rss): MNIST augmented to N images (a random shift of up to 2 pixels, a horizontal flip with
probability 1/2, brightness ×0.6-1.0, each drawn per image from its index, so all N differ) is written as PNG shards
of 1000 with shards.py's writer, once per N (kept in --out). For each N a fresh Python process trains the default
MNIST U-Net for --rss-steps steps at batch 64 from the shards (2 data workers), and reports its own peak resident set
(VmHWM in /proc/self/status) and the peak of each data worker (read from /proc/PID/status before they stop). The
same is done with the N images in memory, for contrast: that path holds every image (N·784 bytes), the streamed one
only a shard index and the current epoch's order (8 bytes per image).

Speed (--part speed): the first --cifar-images images of the CIFAR-10 JPEG copy ($NOISECRAFT_DATA/cifar10-jpeg/
train.tar.gz, unpacked into --out; N/10 per class) are written as shards keeping the JPEG bytes (`noisecraft shard` on
the folder), and the same folder is loaded in memory. In one process, in alternating rounds, the default CIFAR-10
U-Net (what `noisecraft train --dataset cifar10` builds) trains --speed-steps steps at batch 32 after 2 warm-up steps:
in memory, and streamed with 0, 1 and 2 data workers; images/s and the ratio of medians to the in-memory path are
printed. Also measured: how fast the loader alone decodes (images/s, no training), the most it can feed.

Cached latents (--part latent): a VAE (--vae RUN, else the default `train-vae` VAE trained 2 steps on MNIST into
--out: its weights do not change the speed) and the first --latent-images augmented MNIST images, in memory and as PNG
shards with their latent cache (`noisecraft encode`, written once into --out). In one process, in alternating rounds,
the default latent U-Net (what `noisecraft train --dataset mnist --latent VAE` builds) trains --speed-steps steps at
--batch-size after 2 warm-up steps: in memory (the run's own single-file latent cache, encoded when the trainer is
built, outside the timing), streamed with --latents (no image is decoded: sample ids, labels and the cached μ, σ)
with each of --latent-workers data workers, and streamed with the VAE encoding every batch on the fly. Images/s and
the ratio of medians to the in-memory path are printed.

--threads sets torch's threads for training (default 1: the data workers then have the other core of a 2-core
machine). --save writes benchmarks/results/stream_data.json (stream_data_latent.json for --part latent), or --results
PATH. On a GPU machine without the data folder, carry the shards this script wrote and run the speed part there:

    python benchmarks/stream_data.py --part speed --cifar-shards benchmarks/out/stream_data/cifar10-jpeg-10000-shards \
        --device cuda --batch-size 128 --speed-steps 30 --rounds 2 --worker-counts 0,2,4,8 --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "stream_data.json"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def peak_kb(pid: int | str = "self") -> int | None:
    """VmHWM (peak resident set, kB) of a process, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


# ------------------------------------------------------------------ augmented MNIST


def augment(images: torch.Tensor, first: int) -> torch.Tensor:
    """Images first, first+1, ... of the augmented set: a shift of up to 2 pixels, a flip, a brightness factor, each
    drawn from the image's index (uint8 N×1×28×28 in, out)."""
    out = torch.empty_like(images)
    for k, image in enumerate(images):
        g = torch.Generator().manual_seed(first + k)
        dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(2)
        x = (x.float() * (0.6 + 0.4 * torch.rand((), generator=g))).round().clamp(0, 255)
        out[k] = x.to(torch.uint8)
    return out


def augmented_images(mnist, first: int, n: int) -> torch.Tensor:
    src = mnist.images
    idx = torch.arange(first, first + n) % len(src)
    return augment(src[idx], first)


def write_augmented_shards(mnist, n: int, out: Path, shard_size: int = 1000) -> Path:
    """N augmented MNIST images as PNG shards with labels, written one shard at a time with shards.py's writer."""
    from noisecraft.data import shards as sh
    from noisecraft.io.checkpoint import atomic_write, save_json
    if (out / sh.MANIFEST).is_file() and sh.read_manifest(out).count == n:
        return out
    sh._prepare_out(out, overwrite=True)
    tally, listing = sh._Tally(), []
    for s, first in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - first)
        pixels = augmented_images(mnist, first, count)
        labels = mnist.labels[torch.arange(first, first + count) % len(mnist)].tolist()
        chunk = [sh._Entry(label, [], pixels=p) for label, p in zip(labels, pixels)]
        path = atomic_write(out / sh.shard_name(s),
                            lambda tmp, chunk=chunk: sh._write_tar(tmp, chunk, tally, False, "png", 95, None))
        listing.append({"file": path.name, "count": count, "bytes": path.stat().st_size,
                        "sha256": sh.file_sha256(path)})
    save_json({"format": sh.MANIFEST_FORMAT, "version": sh.MANIFEST_VERSION, "source": f"mnist-augmented-{n}:train",
               "count": n, "shards": listing, "class_names": list(mnist.class_names), "labels": True,
               "captions": False, "channels": 1, "image_sizes": dict(tally.sizes), "shuffled": False}, out / sh.MANIFEST)
    return out


def train_steps(trainer, steps: int, device: str = "cpu") -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()             # (returns the loss as a float: the GPU has finished the step)
    return time.perf_counter() - t0


def rss_child(mode: str, n: int, shards: str, steps: int, workers: int, threads: int) -> dict:
    """(in a fresh process) Train `steps` steps and report the peak resident sets."""
    from noisecraft.config import make_run_config
    from noisecraft.data.datasets import ImageDataset, load_dataset
    from noisecraft.data.sources import open_shard_dataset
    from noisecraft.training.trainer import Trainer
    torch.set_num_threads(threads)
    if mode == "shards":
        data = open_shard_dataset(shards, workers=workers)
    else:
        mnist = load_dataset("mnist", download=False)
        images = torch.empty((n, 1, 28, 28), dtype=torch.uint8)
        for first in range(0, n, 1000):
            images[first:first + 1000] = augmented_images(mnist, first, min(1000, n - first))
        labels = mnist.labels[torch.arange(n) % len(mnist)].clone()
        data = ImageDataset(images, labels, list(mnist.class_names), f"mnist-augmented-{n}")
        del mnist
    config = make_run_config(data, False, train={"batch_size": 64, "steps": steps, "sample_every": 0,
                                                 "checkpoint_every": 0, "log_every": 0})
    if mode == "shards":
        config.data = replace(config.data, shards=str(data.folder), shards_fingerprint=data.fingerprint)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, data, tmp, progress=False)
        seconds = train_steps(trainer, steps)
        workers_kb = [peak_kb(pid) for pid in children(os.getpid())]
        trainer.source.close()
    return {"mode": mode, "images": n, "steps": steps, "seconds": round(seconds, 1), "main_peak_kb": peak_kb(),
            "worker_peak_kb": [k for k in workers_kb if k is not None]}


def measure_rss(out: Path, sizes: list[int], steps: int, workers: int, threads: int, say) -> list[dict]:
    from noisecraft.data.datasets import load_dataset
    mnist = load_dataset("mnist", download=False)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        folder = write_augmented_shards(mnist, n, out / f"mnist-aug-{n}")
        say(f"shards of {n} augmented MNIST images in {folder} ({time.perf_counter() - t0:.0f} s to write or check)")
    for mode in ("shards", "memory"):
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", mode, str(n), str(out / f"mnist-aug-{n}"), str(steps),
                   str(workers), str(threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise SystemExit(f"the {mode} run on {n} images failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            say(f"  {mode:6s} {n:7d} images: main process peak {row['main_peak_kb'] / 1024:7.1f} MiB, workers "
                f"{[round(k / 1024, 1) for k in row['worker_peak_kb']]} MiB ({row['steps']} steps, {row['seconds']} s)")
    return rows


# ------------------------------------------------------------------ CIFAR-10 JPEG speed


def cifar_folder(out: Path, n: int) -> Path:
    """The first n/10 JPEGs of each class of the CIFAR-10 JPEG copy, hard-linked into out/cifar10-jpeg-N."""
    from noisecraft.data.datasets import resolve_data_dir
    archive = resolve_data_dir() / "cifar10-jpeg" / "train.tar.gz"
    unpacked = out / "cifar10-jpeg"
    if not (unpacked / "train" / "truck").is_dir():
        if not archive.is_file():
            raise SystemExit(f"{archive} is missing; put the CIFAR-10 JPEG copy there (see its PROVENANCE.md).")
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
    subset = out / f"cifar10-jpeg-{n}"
    if not subset.is_dir():
        for name in CLASSES:
            files = sorted((unpacked / "train" / name).iterdir())[:n // len(CLASSES)]
            (subset / name).mkdir(parents=True)
            for f in files:
                os.link(f, subset / name / f.name)
    return subset


def loader_rate(data, batch: int, workers: int, batches: int) -> float:
    """Images/s of the shard loader alone (decoding, no training)."""
    from noisecraft.data.stream import ShardLoader, ShardStream
    loader = iter(ShardLoader(ShardStream(data.manifest, batch, image_size=data.image_size), num_workers=workers))
    next(loader)                        # start-up (workers, first shards) not counted
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - t0
    loader.close()
    return batches * batch / seconds


def decoded(shards: Path):
    """Every image of a shard set in memory (an ImageDataset), for the in-memory side of the comparison."""
    from noisecraft.data.datasets import ImageDataset
    from noisecraft.data.sources import open_shard_dataset
    from noisecraft.data.stream import ShardLoader, ShardStream
    m = open_shard_dataset(shards).manifest
    stream = ShardStream(m, m.count, end=m.count)
    batch = next(iter(ShardLoader(stream)))
    order = torch.argsort(batch.ids)
    return ImageDataset(batch.images[order].clone(), batch.labels[order].clone(), list(m.class_names),
                        f"shards:{shards}")


def measure_speed(out: Path, n: int, steps: int, rounds: int, threads: int, say, *, device: str = "cpu",
                  batch_size: int = 32, worker_counts=(0, 1, 2), shards: Path | None = None) -> dict:
    from noisecraft.config import make_run_config
    from noisecraft.data.datasets import load_dataset
    from noisecraft.data.shards import write_shards
    from noisecraft.data.sources import open_shard_dataset
    from noisecraft.models.unet import count_parameters
    from noisecraft.training.trainer import Trainer
    torch.set_num_threads(threads)
    if shards is None:
        folder = cifar_folder(out, n)
        shards = out / f"cifar10-jpeg-{n}-shards"
        if not (shards / "manifest.json").is_file():
            write_shards(folder, shards, shard_size=1000, overwrite=True)        # JPEG bytes kept as they are
        memory = load_dataset(f"folder:{folder}")
    else:                     # given shards (another machine): the in-memory copy is decoded from them
        memory = decoded(shards)
    say(f"CIFAR-10 JPEG: {len(memory)} images in memory and as {len(open_shard_dataset(shards).manifest.shards)} "
        f"JPEG shards ({sum(p.stat().st_size for p in shards.glob('*.tar')) / 2**20:.1f} MiB)")
    train = {"batch_size": batch_size, "steps": 10**6, "sample_every": 0, "checkpoint_every": 0, "log_every": 0}
    config = make_run_config(memory, False, train=train)
    modes = {"memory": None, **{f"shards, {w} worker{'s' if w != 1 else ''}": w for w in worker_counts}}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode, workers in modes.items():
                if workers is None:
                    data, cfg = memory, config
                else:
                    data = open_shard_dataset(shards, workers=workers)
                    cfg = replace(config, data=replace(config.data, shards=str(shards),
                                                       shards_fingerprint=data.fingerprint))
                trainer = Trainer(cfg, data, Path(tmp) / f"{r}-{workers}", device=device, progress=False)
                train_steps(trainer, 2)                                   # warm-up: workers start, shards open
                rates[mode].append(steps * batch_size / train_steps(trainer, steps, device))
                trainer.source.close()
            say(f"  round {r + 1}: " + ", ".join(f"{m} {v[-1]:.1f}" for m, v in rates.items()) + " images/s")
        params = count_parameters(Trainer(config, memory, Path(tmp) / "count", progress=False).model)
    medians = {m: statistics.median(v) for m, v in rates.items()}
    decode = {w: loader_rate(open_shard_dataset(shards), batch_size, w, 40) for w in worker_counts}
    say("medians: " + ", ".join(f"{m} {v:.1f} ({v / medians['memory']:.3f}× memory)" for m, v in medians.items()))
    say("the loader alone (decode, no training): "
        + ", ".join(f"{w} worker(s) {v:.0f} images/s" for w, v in decode.items()))
    return {"images": len(memory), "device": device, "batch_size": batch_size, "steps_per_measurement": steps,
            "rounds": rounds,
            "unet_parameters": params, "images_per_s": rates, "median_images_per_s": medians,
            "ratio_to_memory": {m: v / medians["memory"] for m, v in medians.items()},
            "loader_only_images_per_s": {str(w): v for w, v in decode.items()}}


# ------------------------------------------------------------------ cached latents speed


def tiny_vae(out: Path, say) -> Path:
    """The default train-vae VAE, trained 2 steps on MNIST (once, into out/vae): right shapes, any weights."""
    from noisecraft.cli import main as cli
    run = out / "vae"
    if not (run / "model.safetensors").is_file():
        if cli(["train-vae", "--dataset", "mnist", "--no-download", "--out", str(run), "--steps", "2"]) != 0:
            raise SystemExit("training the benchmark's VAE failed (is MNIST in $NOISECRAFT_DATA?)")
        say(f"VAE for the benchmark in {run}")
    return run


def measure_latent_speed(out: Path, n: int, steps: int, rounds: int, threads: int, say, *, device: str = "cpu",
                         batch_size: int = 32, worker_counts=(0, 1), vae: Path | None = None) -> dict:
    """Training images/s of a latent run: in memory vs streamed from shards with cached latents (and on the fly)."""
    from noisecraft.components import attach_components
    from noisecraft.config import make_run_config
    from noisecraft.data.datasets import ImageDataset, load_dataset
    from noisecraft.data.latent_shards import MANIFEST as LATENTS, encode_shards
    from noisecraft.data.sources import open_shard_dataset
    from noisecraft.models.unet import count_parameters
    from noisecraft.training.trainer import Trainer
    torch.set_num_threads(threads)
    mnist = load_dataset("mnist", download=False)
    shards = write_augmented_shards(mnist, n, out / f"mnist-aug-{n}")
    memory = ImageDataset(augmented_images(mnist, 0, n), mnist.labels[torch.arange(n) % len(mnist)].clone(),
                          list(mnist.class_names), f"mnist-augmented-{n}")
    del mnist
    vae = vae or tiny_vae(out, say)
    cache = out / f"mnist-aug-{n}-latents"
    t0 = time.perf_counter()
    if not (cache / LATENTS).is_file() or json.loads((cache / LATENTS).read_text())["vae_run"] != str(vae.resolve()):
        encode_shards(vae, shards, cache, device=device)
        say(f"latent cache of {n} images written to {cache} in {time.perf_counter() - t0:.0f} s")
    train = {"batch_size": batch_size, "steps": 10**6, "sample_every": 0, "checkpoint_every": 0, "log_every": 0}
    modes = {"memory": ("memory", None), **{f"cached latents, {w} worker{'s' if w != 1 else ''}": ("cached", w)
                                           for w in worker_counts}, "VAE on the fly, 1 worker": ("fly", 1)}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    memory_batches = []      # the in-memory latents, encoded by the first in-memory trainer and reused
    with tempfile.TemporaryDirectory() as tmp:
        def build(kind: str, workers: int | None, run: Path):
            data = memory if kind == "memory" else open_shard_dataset(
                shards, workers=workers, latents=cache if kind == "cached" else None)
            latent, _ = attach_components(run, data.image_shape, vae)
            config = make_run_config(data, False, train=train, latent=latent)
            if kind != "memory":
                config.data = replace(config.data, shards=str(shards), shards_fingerprint=data.fingerprint,
                                      latents=str(cache) if kind == "cached" else None)
            batches = memory_batches[0] if kind == "memory" and memory_batches else None
            trainer = Trainer(config, data, run, device=device, progress=False, batches=batches)
            if kind == "memory" and not memory_batches:
                memory_batches.append(trainer.batches)
            return trainer
        for r in range(rounds):
            for mode, (kind, workers) in modes.items():
                trainer = build(kind, workers, Path(tmp) / f"{r}-{kind}-{workers}")
                train_steps(trainer, 2)                                   # warm-up: workers start, shards open
                rates[mode].append(steps * batch_size / train_steps(trainer, steps, device))
                trainer.source.close()
            say(f"  round {r + 1}: " + ", ".join(f"{m} {v[-1]:.1f}" for m, v in rates.items()) + " images/s")
        params = count_parameters(build("memory", None, Path(tmp) / "count").model)
    medians = {m: statistics.median(v) for m, v in rates.items()}
    say("medians: " + ", ".join(f"{m} {v:.1f} ({v / medians['memory']:.3f}× memory)" for m, v in medians.items()))
    return {"images": n, "device": device, "batch_size": batch_size, "steps_per_measurement": steps,
            "rounds": rounds, "unet_parameters": params, "vae": str(vae), "images_per_s": rates,
            "median_images_per_s": medians, "ratio_to_memory": {m: v / medians["memory"] for m, v in medians.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("rss", "speed", "both", "latent"), default="both",
                   help="both: rss and speed; latent: cached latents vs in memory (run on its own)")
    p.add_argument("--sizes", default="10000,200000", help="augmented MNIST set sizes for the memory part")
    p.add_argument("--rss-steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2, help="data workers of the memory part")
    p.add_argument("--cifar-images", type=int, default=10000)
    p.add_argument("--speed-steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="the speed part's training device (cpu, cuda)")
    p.add_argument("--batch-size", type=int, default=32, help="the speed part's batch")
    p.add_argument("--worker-counts", default="0,1,2", help="the speed part's numbers of data workers")
    p.add_argument("--cifar-shards", default=None,
                   help="the speed part on these shards (the in-memory copy decoded from them) instead of the JPEG "
                        "folder: for a machine without $NOISECRAFT_DATA")
    p.add_argument("--latent-images", type=int, default=5000, help="augmented MNIST images of the latent part")
    p.add_argument("--latent-workers", default="0,1", help="the latent part's data workers for the cached shards")
    p.add_argument("--vae", default=None, help="the latent part's VAE run (default: a 2-step one, trained into --out)")
    p.add_argument("--out", default="benchmarks/out/stream_data")
    p.add_argument("--save", action="store_true")
    p.add_argument("--results", default=str(RESULTS), help="where --save writes")
    p.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, n, shards, steps, workers, threads = args.child
        print(json.dumps(rss_child(mode, int(n), shards, int(steps), int(workers), int(threads))))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"load average {os.getloadavg()[0]:.1f} at the start", "torch": torch.__version__,
               "threads": args.threads}
    print(summary["machine"])
    t0 = time.perf_counter()
    if args.part in ("rss", "both"):
        sizes = [int(s) for s in args.sizes.split(",")]
        rows = measure_rss(out, sizes, args.rss_steps, args.workers, args.threads, print)
        by = {(r["mode"], r["images"]): r for r in rows}
        small, large = sizes[0], sizes[-1]
        for mode in ("shards", "memory"):
            a, b = by[(mode, small)]["main_peak_kb"], by[(mode, large)]["main_peak_kb"]
            print(f"{mode}: main-process peak {b / 1024:.1f} MiB at {large} images vs {a / 1024:.1f} MiB at {small}: "
                  f"{100 * (b - a) / a:+.1f}%")
        summary["rss"] = rows
    if args.part in ("speed", "both"):
        summary["speed"] = measure_speed(out, args.cifar_images, args.speed_steps, args.rounds, args.threads, print,
                                         device=args.device, batch_size=args.batch_size,
                                         worker_counts=[int(w) for w in args.worker_counts.split(",")],
                                         shards=Path(args.cifar_shards) if args.cifar_shards else None)
    if args.part == "latent":
        summary["latent_speed"] = measure_latent_speed(
            out, args.latent_images, args.speed_steps, args.rounds, args.threads, print, device=args.device,
            batch_size=args.batch_size, worker_counts=[int(w) for w in args.latent_workers.split(",")],
            vae=Path(args.vae) if args.vae else None)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"done in {summary['wall_s']} s")
    if args.save:
        path = Path(args.results)
        if args.part == "latent" and path == RESULTS:        # (the pixel parts' results stay)
            path = RESULTS.with_name("stream_data_latent.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
