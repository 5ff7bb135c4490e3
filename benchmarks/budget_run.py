"""One recipe of the CPU-budget benchmarks (mnist_budget.py), in two phases.

    python benchmarks/budget_run.py train --dataset mnist --recipe noisecraft-edm --cpu-minutes 20 --out OUT
    python benchmarks/budget_run.py score --dataset mnist --recipe noisecraft-edm --device cuda --n 1000 --out OUT

train: one thread, until the process has used --cpu-minutes of CPU time (time.process_time: fair when other programs
share the machine, unlike wall time), then the weights go to OUT/models/<dataset>-<recipe>/ (a run folder for ours,
safetensors for the peers). score: load them, sample with each sampler setting and score every set with the domain
score; sampling is not part of the budget, so it may run on a GPU (1000 samples at 1000 evaluations). Writes
OUT/<dataset>-<recipe>.json and grid PNGs.

Recipes: noisecraft (the defaults), noisecraft-v (the defaults with --prediction v), noisecraft-edm
(--preconditioning edm), diffusers (its MNIST tutorial),
lucidrains (denoising-diffusion-pytorch's README recipe), smalldiffusion (its Fashion-MNIST DiT example), and for
colour images diffusers_example (its unconditional-training example scaled to 32×32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noisecraft.components import attach_components  # noqa: E402
from noisecraft.config import make_run_config  # noqa: E402
from noisecraft.data.datasets import load_dataset  # noqa: E402
from noisecraft.evaluation.classifier import load_or_train_classifier  # noqa: E402
from noisecraft.evaluation.fid import domain_fid, reference_statistics  # noqa: E402
from noisecraft.models.unet import count_parameters  # noqa: E402
from noisecraft.pipelines.diffusion import DiffusionPipeline  # noqa: E402
from noisecraft.training.trainer import Trainer  # noqa: E402
from noisecraft.viz.images import save_grid  # noqa: E402

# (sampler, steps, spacing) for our runs: each sampler's steps chosen for NFE 10, 20, 50 and the 1000-step
# references. heun costs 2 evaluations per step but one at the last (2·steps - 1); all σ-spaced samplers use
# EDM's Karras σ's, the discrete ones (ddpm, ddim) the run's own timesteps.
OUR_SETTINGS = [
    ("ddpm", 10, None), ("ddpm", 20, None), ("ddpm", 50, None), ("ddpm", 1000, None),
    ("ddim", 10, None), ("ddim", 20, None), ("ddim", 50, None), ("ddim", 1000, None),
    ("heun", 5, "karras"), ("heun", 10, "karras"), ("heun", 18, "karras"), ("heun", 50, "karras"),
    ("dpmpp_2m", 10, "karras"), ("dpmpp_2m", 20, "karras"), ("dpmpp_2m", 50, "karras"),
    ("euler", 20, "karras"), ("euler_ancestral", 20, "karras"), ("dpmpp_2m_sde", 20, "karras"),
]
# the peers' own default sampler steps, and 20 network evaluations (smalldiffusion's default is already 20)
# what a CPU can score in minutes: each sampler at ≤ 50 evaluations
CPU_SETTINGS = [("ddpm", 10, None), ("ddim", 20, None), ("ddim", 50, None), ("heun", 5, "karras"),
                ("heun", 10, "karras"), ("dpmpp_2m", 10, "karras"), ("dpmpp_2m", 20, "karras"), ("euler", 20, "karras")]
# the comparisons at the least cost: today's DDIM-50, and our best candidates at ≤ 20 evaluations
KEY_SETTINGS = [("ddim", 50, None), ("heun", 5, "karras"), ("heun", 10, "karras"), ("dpmpp_2m", 20, "karras")]
# the second goal on its own, at a smaller n that a CPU can afford at 1000 evaluations: the deterministic
# candidates at ≤ 20 NFE against DDPM-1000 (the most accurate sampler at 1000 NFE), all at the same n (the score's
# small-sample bias depends on n, so only rows of one file are compared)
REF_SETTINGS = [("heun", 10, "karras"), ("dpmpp_2m", 20, "karras"), ("ddpm", 1000, None)]
OUR_RECIPES = ("noisecraft", "noisecraft-v", "noisecraft-edm")
PEER_STEPS = {"diffusers": (50, 20), "lucidrains": (250, 20), "smalldiffusion": (20, 20),
              "diffusers_example": (1000, 20)}


def parse_settings(text: str) -> list:
    """A named list of settings, or one written out: "ddim:20,ddpm:50,dpmpp_2m:20:karras" (sampler:steps[:spacing])."""
    named = {"all": OUR_SETTINGS, "cpu": CPU_SETTINGS, "key": KEY_SETTINGS, "ref": REF_SETTINGS,
             "few": [("ddim", 50, None), ("heun", 10, "karras"), ("dpmpp_2m", 20, "karras")]}
    if text in named:
        return named[text]
    try:
        return [(p[0], int(p[1]), p[2] if len(p) > 2 else None) for p in (item.split(":") for item in text.split(","))]
    except (IndexError, ValueError):
        raise SystemExit(f"--settings {text!r}: give one of {', '.join(named)} or sampler:steps[:spacing],...") from None


def nfe(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def peer_module(recipe: str):
    import importlib
    if recipe not in PEER_STEPS:
        raise SystemExit(f"unknown recipe {recipe!r}; choose one of {', '.join(OUR_RECIPES + tuple(sorted(PEER_STEPS)))}")
    module = importlib.import_module(f"{recipe}_recipe")
    module.CLOCK = time.process_time      # the budget is CPU time
    return module


# --- train -------------------------------------------------------------------------------------------------


def train_ours(dataset, recipe: str, cpu_minutes: float, folder: Path, seed: int, vae_run: str | None = None) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    # a latent run denoises the latents of a VAE trained beforehand (noisecraft train-vae); its cost is not in the
    # budget, and the run keeps a copy of it (components.py), so scoring decodes with the same VAE
    latent = attach_components(folder, dataset.image_shape, vae_run)[0] if vae_run else None
    # "noisecraft" is the default VP recipe (cosine, ε, Min-SNR 5); "noisecraft-v" the same with v-prediction, which,
    # unlike ε, can be distilled to a few steps; "noisecraft-edm" is --preconditioning edm
    diffusion = {"prediction": {"noisecraft-edm": "edm", "noisecraft-v": "v"}.get(recipe, "eps")}
    config = make_run_config(dataset, diffusion=diffusion, latent=latent,
                             train={"steps": 10**9, "seed": seed, "sample_every": 0, "checkpoint_every": 0})
    trainer = Trainer(config, dataset, folder, progress=False)
    start = time.process_time()
    while time.process_time() - start < cpu_minutes * 60:
        trainer.train_step()
    seconds = time.process_time() - start
    trainer.save_checkpoint()
    return {"parameters": count_parameters(trainer.model), "steps": trainer.step,
            "train_images_per_s": trainer.step * config.train.batch_size / seconds, "cpu_seconds": seconds}


def train_peer(dataset, recipe: str, cpu_minutes: float, folder: Path, seed: int, batch_size: int | None = None) -> dict:
    from safetensors.torch import save_file
    module = peer_module(recipe)
    extra = {"batch_size": batch_size} if batch_size else {}
    model, stats = module.train_recipe(dataset, minutes=cpu_minutes, seed=seed, progress=False, **extra)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return {"parameters": stats["parameters"], "steps": stats["steps"], "train_images_per_s": stats["images_per_s"],
            "cpu_seconds": stats.get("seconds")}


def load_peer(recipe: str, folder: Path, image_shape, device: str):
    from safetensors.torch import load_file
    module = peer_module(recipe)
    c, h, w = image_shape
    if recipe in ("diffusers", "diffusers_example"):
        model = module.build_recipe_unet(sample_size=h, channels=c)
    elif recipe == "lucidrains":
        pad = module.padding_for(h, w)
        model = module.build_recipe_diffusion(image_size=h + pad[2] + pad[3], channels=c)
        model.data_shape = (c, h, w)
    else:
        model, schedule = module.build_recipe("dit", image_size=h, channels=c)
        model.recipe_schedule = schedule
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return module, model.to(device).eval()


# --- score -------------------------------------------------------------------------------------------------


def draws_ours(folder: Path, device: str, n: int, settings, seed: int):
    pipe = DiffusionPipeline.from_run(folder, device=device)
    d, default_drawn = pipe.defaults, False
    for sampler, steps, spacing in settings:
        # a named sampler without a spacing: the run's plain σ's (leading for VP runs, Karras for EDM runs), which
        # every stored row was scored on (pipelines/defaults.py, other_spacing)
        spacing = d.resolve(sampler, steps, spacing=spacing)["spacing"]
        t0 = time.perf_counter()
        images = pipe.sample(n, sampler=sampler, steps=steps, spacing=spacing, seed=seed, batch_size=500).images
        row = {"sampler": sampler, "steps": steps, "spacing": spacing, "nfe": nfe(sampler, steps),
               "sample_s": time.perf_counter() - t0}
        if (sampler, steps, spacing) == (d.sampler, d.steps, d.spacing):
            row["default"] = default_drawn = True   # the run's default is among the settings: marked, not drawn twice
        yield row, images.cpu()
    if default_drawn:
        return
    yield {"sampler": f"default ({d.sampler})", "steps": d.steps, "spacing": d.spacing, "nfe": nfe(d.sampler, d.steps),
           "default": True}, pipe.sample(n, seed=seed, batch_size=500).images.cpu()


def draws_peer(recipe: str, folder: Path, image_shape, device: str, n: int, seed: int, max_nfe: int):
    module, model = load_peer(recipe, folder, image_shape, device)
    own, common = PEER_STEPS[recipe]
    for steps, default in ((own, True), (common, False)) if own != common else ((own, True),):   # one draw if equal
        if steps > max_nfe:
            print(f"{recipe}: {steps} steps skipped (--max-nfe {max_nfe})", flush=True)
            continue
        t0 = time.perf_counter()
        images = module.sample_recipe(model, n, steps=steps, seed=seed)
        yield {"sampler": "own default" if default else "own sampler, 20 NFE", "steps": steps, "nfe": steps,
               "default": default, "sample_s": time.perf_counter() - t0}, images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=["train", "score"])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--recipe", required=True)
    p.add_argument("--cpu-minutes", type=float, default=20.0)
    p.add_argument("--device", default="cpu", help="score: where to sample")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="all",
                   help="score, our runs: all | cpu (≤ 50 NFE) | key | few (ddim-50, heun-10, dpmpp_2m-20) | ref "
                        "(heun-10, dpmpp_2m-20 and ddpm-1000; written to <dataset>-<recipe>-ref.json) | a list "
                        "sampler:steps[:spacing],... (written to <dataset>-<recipe>-extra.json)")
    p.add_argument("--max-nfe", type=int, default=10**9, help="score: skip settings that cost more evaluations")
    p.add_argument("--peer-batch-size", type=int, default=None,
                   help="train: a peer's batch instead of its recipe's (smalldiffusion's 1024 needs ~15 GB)")
    p.add_argument("--latent", default=None, metavar="VAE_RUN",
                   help="our recipes: a latent run on this VAE (train; scoring reads the same -latent run, which holds "
                        "a copy of the VAE)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None, help="domain classifier cache")
    p.add_argument("--out", default="benchmarks/out/budget")
    args = p.parse_args(argv)
    out = Path(args.out)
    tag = f"{args.dataset}-{args.recipe}" + ("-latent" if args.latent else "")
    folder = out / "models" / tag
    ours = args.recipe in OUR_RECIPES
    if args.latent and not ours:
        raise SystemExit(f"--latent trains our recipes only ({', '.join(OUR_RECIPES)}), not {args.recipe!r}")

    if args.phase == "train":
        torch.set_num_threads(1)
        train = load_dataset(args.dataset, "train", data_dir=args.data_dir)
        if ours:
            stats = train_ours(train, args.recipe, args.cpu_minutes, folder, args.seed, args.latent)
        else:
            stats = train_peer(train, args.recipe, args.cpu_minutes, folder, args.seed, args.peer_batch_size)
            stats["batch_size"] = args.peer_batch_size or "the recipe's"
        stats.update(dataset=args.dataset, recipe=args.recipe, cpu_minutes=args.cpu_minutes, threads=1,
                     **({"vae_run": str(args.latent)} if args.latent else {}))
        (folder / "train.json").write_text(json.dumps(stats, indent=2) + "\n")
        print(f"{tag}: {stats['steps']} steps, {stats['train_images_per_s']:.1f} images per CPU-second", flush=True)
        return

    test = load_dataset(args.dataset, "test", data_dir=args.data_dir)
    classifier = load_or_train_classifier(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    reference = reference_statistics(test, classifier)
    result = json.loads((folder / "train.json").read_text())
    result.update(n=args.n, sample_device=args.device, samples=[])
    if ours:
        settings = parse_settings(args.settings)
        settings = [s for s in settings if nfe(s[0], s[1]) <= args.max_nfe]
        draws = draws_ours(folder, args.device, args.n, settings, args.seed)
    else:
        draws = draws_peer(args.recipe, folder, tuple(test.image_shape), args.device, args.n, args.seed, args.max_nfe)
    try:
        for row, images in draws:
            row["score"] = domain_fid(images, reference, classifier)
            result["samples"].append(row)
            if row.get("default") or (row["sampler"], row["nfe"]) in (("heun", 19), ("ddim", 50), ("ddpm", 1000)):
                save_grid(images[:64], out / f"{tag}-{row['sampler'].split()[0]}-{row['steps']}.png", nrow=8)
            print(f"{tag}: {row['sampler']:<22} {row['steps']:>5} steps  nfe {row['nfe']:>5}  score "
                  f"{row['score']:8.2f}", flush=True)
    except Exception:   # keep what was measured; the report names the failure
        result["error"] = traceback.format_exc(limit=3)
        print(result["error"], file=sys.stderr)
    suffix = {"ref": "-ref"}.get(args.settings, "-extra" if ":" in args.settings else "")
    name = f"{tag}{suffix}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
