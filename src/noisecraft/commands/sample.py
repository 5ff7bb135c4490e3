"""Drawing and editing with any model: `sample`, `txt2img`, `img2img`, `inpaint` and `interpolate`.

Every sampling flag defaults to None, "the model's own default": the pipeline fills it in (see
pipelines/defaults.py), so the command line, Python and the UI draw the same picture from the same request."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import NoisecraftError
from ..viz.process import trajectory_frames
from .arg_types import count, finite_float, int_at_least, positive_int


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
    if getattr(args, "s_churn", None) is not None:   # EDM's churn (Algorithm 2), for euler and heun
        options["s_churn"] = args.s_churn
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

    from ..io.checkpoint import atomic_write_bytes
    from ..viz.images import save_gif, save_grid, to_uint8
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
        frames, _, captions = trajectory_frames(result.trajectory)
        written.append(save_gif(frames, args.gif, captions=captions))
    return written


def _need_output(args) -> None:
    if not (args.out or args.grid or args.gif or getattr(args, "png_dir", None)):
        raise NoisecraftError("say what to write: --out samples.npz, --grid grid.png, --gif denoise.gif and/or "
                              "--png-dir DIR.")


def _load_pipeline(args):
    """The run, diffusers folder or SD single file named by RUN or --model, with the memory options applied. The
    sampling flags the user left out stay None: the pipeline fills in the model's own defaults."""
    from ..pipelines.stable_diffusion import load_pipeline
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
    return pipe


def _shown_settings(pipe, args, path: bool = False) -> dict:
    """The sampler and steps this call will use (the flags, else the model's defaults), for the progress bar and
    the GIF's frame spacing; the pipeline resolves them the same way."""
    return pipe.defaults.resolve(args.sampler, args.steps, path=path)


def _gif_every(args, steps: int) -> int:
    """--save-every, or with --gif alone about 25 frames."""
    return args.save_every or (max(1, steps // 25) if args.gif else 0)


def _size_options(args) -> dict:
    return {k: getattr(args, k) for k in ("height", "width") if getattr(args, k, None) is not None}


def _mixed_prompt(pipe, args):
    """--mix-prompt B [--mix w] [--mix-tokens i j ...]: the prompt's embeddings blended with B's."""
    if getattr(args, "mix_prompt", None) is None:
        return None
    if args.prompt is None:
        raise NoisecraftError("--mix-prompt blends a second prompt into the first; give the first one too.")
    mixed = pipe.mix_prompts(args.prompt, args.mix_prompt, args.mix, args.mix_tokens)
    a, b = (pipe.text_encoder.token_strings(p) for p in (args.prompt, args.mix_prompt))
    for i in args.mix_tokens if args.mix_tokens is not None else range(max(len(a), len(b))):
        shown = [tokens[i] if i < len(tokens) else "<pad>" for tokens in (a, b)]
        print(f"mixing position {i}: {shown[0]!r} with {shown[1]!r} (weight {args.mix:g})")
    return mixed


def _write_steps(result, args) -> list:
    """--save-every k: each kept step as a PNG (top row: x_t decoded, bottom row: the predicted x̂0)."""
    import torch

    from ..viz.images import save_grid
    if not args.save_every or not result.trajectory:
        return []
    base = Path(args.grid or args.out or args.gif or getattr(args, "png_dir", None))
    folder = Path(args.steps_dir) if getattr(args, "steps_dir", None) else base.with_name(base.stem + "_steps")
    written = []
    for info in result.trajectory:
        shown = info["preview"][:8].clamp(-1, 1)
        pair = torch.cat([shown, info["denoised"][:8].clamp(-1, 1)])
        written.append(save_grid(pair, folder / f"step_{info['i'] + 1:03d}.png", nrow=len(shown)))
    return [folder] if written else []


def _report_memory(memory) -> str:
    from ..memory import format_bytes
    return f"; peak memory {format_bytes(memory.peak_total_bytes)} ({memory.method})"


# --- parameters in the PNG: --png-dir writes them, --from-png reads them back (io/png_params.py) ---------------

_FROM_PNG = ("sampler", "steps", "guidance", "spacing", "eta", "variance", "label", "negative_label", "prompt",
             "negative_prompt", "height", "width", "dtype", "model_config", "mix_prompt")
MAX_REDRAWN_BATCH = 256     # --from-png redraws the picture's batch up to this size (a hostile PNG cannot ask more)


def _restore_from_png(args) -> None:
    """--from-png: every setting the picture carries, for what the flags leave open. Without --seed and --n, the
    picture's batch is drawn again (the same picture bit for bit) and only it is kept; else image i's seed, seed + i."""
    from ..io.png_params import image_seed, read_png_params
    params = read_png_params(args.from_png)
    if params.get("job") not in (None, "sample", "txt2img"):
        raise NoisecraftError(f"{args.from_png} was made by {params['job']}, which starts from an input image; "
                              f"run noisecraft {params['job']} with that image instead.")
    if not (args.run or args.model):
        model = params.get("model")
        if not model or not Path(model).exists():
            raise NoisecraftError(f"the model that drew {args.from_png} ({model or 'not named'}) is not here; give "
                                  "it as RUN or --model.")
        args.run = model
    if args.mix_prompt is None and params.get("mix_prompt") is not None:
        args.mix = params.get("mix", args.mix)
        args.mix_tokens = params.get("mix_tokens", args.mix_tokens)
    for key in _FROM_PNG:
        if getattr(args, key, None) is None and params.get(key) is not None:
            setattr(args, key, params[key])
    args.karras = args.karras or bool(params.get("karras"))
    args.vae_tiling = args.vae_tiling or bool(params.get("vae_tiling"))
    n, size, index = params.get("n"), params.get("batch_size"), params.get("index") or 0
    if args.seed is None and args.n is None and n and size and 0 <= index < n:
        # its own batch again, keeping only this picture: batched kernels round differently for other batch sizes
        start = index // size * size
        count = min(size, n - start)
        if 1 < count <= MAX_REDRAWN_BATCH:
            args.seed, args.n, args.batch_size, args.keep_index = params.get("seed", 0) + start, count, count, \
                index - start
    if args.seed is None:
        args.seed = image_seed(params)
    if params.get("guide") and not args.guide:   # code named inside a picture is never imported
        print(f"note: {args.from_png} was drawn with loss guidance (--guide {params['guide']}); give --guide again "
              "to reproduce it.", file=sys.stderr)


def _write_pngs(pipe, result, args, job: str) -> list:
    """--png-dir DIR: each image as DIR/{i:05d}-{seed+i}.png carrying the parameters that reproduce it."""
    if not getattr(args, "png_dir", None):
        return []
    from ..io.png_params import write_png
    from ..viz.images import to_uint8
    model = getattr(args, "model", None) or args.run
    params = dict(model=str(Path(model).resolve()), job=job, **pipe.defaults.resolve(args.sampler, args.steps,
                  args.guidance, args.spacing), eta=args.eta, variance=args.variance, karras=args.karras or None,
                  seed=args.seed, prompt=args.prompt if isinstance(args.prompt, str) else None,
                  negative_prompt=args.negative_prompt, negative_label=args.negative_label,
                  height=int(result.images.shape[-2]), width=int(result.images.shape[-1]), dtype=args.dtype,
                  model_config=args.model_config, vae_tiling=args.vae_tiling or None, n=args.n,
                  batch_size=min(args.batch_size, args.n))
    if args.mix_prompt is not None:
        params.update(mix_prompt=args.mix_prompt, mix=args.mix, mix_tokens=args.mix_tokens)
    if args.guide:
        params.update(guide=args.guide, guide_scale=args.guide_scale, guide_every=args.guide_every,
                      guide_mode=args.guide_mode, guide_max_sigma=args.guide_max_sigma)
    folder, offset = Path(args.png_dir), getattr(args, "keep_index", 0)
    for i, image in enumerate(to_uint8(result.images)):
        label = int(result.labels[i]) if result.labels is not None else args.label
        index = offset + i
        write_png(folder / f"{index:05d}-{args.seed + index}.png", image, {**params, "index": index, "label": label})
    return [folder]


def _keep_one(result, k: int):
    """--from-png redrew a batch: keep its picture k (and its trajectory)."""
    from dataclasses import replace

    def part(v):
        return v[k:k + 1] if hasattr(v, "shape") and v.ndim and v.shape[0] > k else v
    labels = None if result.labels is None else result.labels[k:k + 1]
    return replace(result, images=result.images[k:k + 1], labels=labels,
                   trajectory=[{key: part(v) for key, v in info.items()} for info in result.trajectory])


def cmd_sample(args) -> int:
    from ..memory import PeakMemory

    if getattr(args, "from_png", None):
        _restore_from_png(args)
    args.seed = 0 if args.seed is None else args.seed
    args.n = args.n or (1 if getattr(args, "from_png", None) else 64)
    _need_output(args)
    with PeakMemory(args.device) as memory:
        pipe = _load_pipeline(args)
        result, seconds = _draw(pipe, args)
    if getattr(args, "keep_index", None) is not None:
        result = _keep_one(result, args.keep_index)
    written = (_write_results(result, args) + _write_steps(result, args)
               + _write_pngs(pipe, result, args, "txt2img" if args.prompt is not None else "sample"))
    print(f"{args.n} samples in {seconds:.1f} s ({seconds / args.n * 1000:.1f} ms/image); wrote "
          + ", ".join(str(p) for p in written) + _report_memory(memory))
    return 0


def _draw(pipe, args):
    options = {**_sampler_options(args), **_control_options(args), **_size_options(args)}
    mixed = _mixed_prompt(pipe, args)
    if mixed is not None:
        options["prompt"] = mixed
    shown = _shown_settings(pipe, args)
    progress, close = _progress(args.n, f"{shown['sampler']}-{shown['steps']}")
    t0 = time.perf_counter()
    try:
        result = pipe.sample(args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                             save_every=_gif_every(args, shown["steps"]),
                             batch_size=args.batch_size, spacing=args.spacing, progress=progress, **options)
    finally:
        close()
    return result, time.perf_counter() - t0


def cmd_txt2img(args) -> int:
    """`sample` for text-conditional runs, with the prompt as the second positional argument."""
    args.prompt = args.text
    args.n = args.n or 16
    return cmd_sample(args)


def _edit(args, job: str) -> int:
    """img2img and inpaint: read --input (and --mask), edit, write."""
    from ..io.images import load_images, load_mask

    _need_output(args)
    args.seed = 0 if args.seed is None else args.seed
    pipe = _load_pipeline(args)
    channels = pipe.image_shape[0]
    if args.height or args.width:
        _, height, width = pipe.image_shape
        height, width = args.height or height, args.width or width
    else:   # the input's own size, rounded to what the model takes (as diffusers' img2img does)
        native = tuple(load_images(args.input, channels).shape[-2:])
        height, width = pipe.round_size(*native)
        if (height, width) != native:
            print(f"note: the input is {native[0]}×{native[1]}; resized to {height}×{width}, a multiple of "
                  f"{pipe.downsample_factor} for this model.", file=sys.stderr)
    images = load_images(args.input, channels, (height, width))
    options = {**_sampler_options(args), **_control_options(args)}
    mixed = _mixed_prompt(pipe, args)
    if mixed is not None:
        options["prompt"] = mixed
    n = args.n if args.n is not None else images.shape[0]
    shown = _shown_settings(pipe, args)
    progress, close = _progress(n, f"{job} {shown['sampler']}-{shown['steps']}")
    common = dict(n=n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                  save_every=_gif_every(args, shown["steps"]),
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
                                    save_every=_gif_every(args, _shown_settings(pipe, args, path=True)["steps"]),
                                    **_sampler_options(args), **_size_options(args))
    args.nrow = args.n                    # one row: the path from left to right
    written = _write_results(result, args)
    print(f"{args.n} images from seed {args.seeds[0]} to seed {args.seeds[1]}; wrote "
          + ", ".join(str(p) for p in written))
    return 0


def add_sampling_args(q, outputs: bool = True) -> None:
    """The flags shared by sample, txt2img, img2img, inpaint and interpolate."""
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
    q.add_argument("--sampler", default=None,
                   help="ddpm | ddim | plms | lms | euler | euler_ancestral | heun | dpmpp_2m | dpmpp_2m_sde | "
                        "langevin | pc | consistency, or a known alias: 'Euler a', 'DPM++ 2M', 'DPM++ 2M Karras' "
                        "(any name + ' Karras'); default: the model's (dpmpp_2m_sde for our pixel and text runs, "
                        "ddpm for latent runs, heun for EDM runs, dpmpp_2m for progressive students, consistency "
                        "for consistency students, lms for Stable Diffusion)")
    q.add_argument("--steps", type=positive_int, default=None,
                   help="sampler steps (default: the model's; 20 for our pixel and text runs, 10 for latent and EDM "
                        "runs, a student's own, 50 for SD)")
    q.add_argument("--spacing", default=None,
                   help="leading | trailing | linspace | karras | nested (default: the model's; karras for our "
                        "pixel, text and EDM runs, leading for latent runs, nested for distilled ones, linspace for "
                        "Stable Diffusion)")
    q.add_argument("--karras", action="store_true", help="Karras et al. (EDM) sigma spacing instead of --spacing")
    q.add_argument("--eta", type=finite_float(lo=0), default=None,
                   help="noise of ddim, euler_ancestral, dpmpp_2m_sde (0: deterministic)")
    q.add_argument("--s-churn", type=finite_float(lo=0), default=None,
                   help="euler / heun: EDM's churn S_churn (Karras et al. 2022, Alg. 2; 0 = deterministic)")
    q.add_argument("--variance", default=None,
                   help="DDPM variance: small (posterior) | large (beta) | learned (--learn-sigma models' default)")
    q.add_argument("--guidance", type=finite_float(), default=None,
                   help="classifier-free guidance scale w, 1 = none (default: the model's; 2 for text runs, "
                        "4 for EDM text runs and distilled text students, 7.5 for SD)")
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
        q.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i "
                                                                   "(default 0)")
        q.add_argument("--label", type=int, default=None, help="class to draw (conditional runs)")
        q.add_argument("--prompt", default=None, help="what to draw (text-conditional runs)")
        q.add_argument("--batch-size", type=positive_int, default=250)
        q.add_argument("--guide", default=None,
                       help="loss guidance: module:function or path/to/file.py:function, a loss(x0) -> one value "
                            "per sample to push down, e.g. noisecraft.guidance.objectives:brightness")
        q.add_argument("--guide-scale", type=finite_float(), default=0.05, help="loss guidance step size (pixel units)")
        q.add_argument("--guide-every", type=positive_int, default=1, help="apply loss guidance every k denoiser calls")
        q.add_argument("--guide-mode", default="x0", choices=["x0", "score", "latents"],
                       help="x0: shift x0_hat by the loss gradient (cheap, robust); score: gradient through the "
                            "network (Universal Guidance, Bansal et al. 2023); latents: the SD tutorials' recipe, "
                            "x -= scale*sigma^2*grad every --guide-every steps but the first (euler, heun, lms)")
        q.add_argument("--guide-max-sigma", type=finite_float(lo=0), default=None,
                       help="apply loss guidance only at noise levels sigma <= this "
                            "(useful with --guide-mode score)")


def _add_png_args(q) -> None:
    q.add_argument("--png-dir", default=None, metavar="DIR",
                   help="also write each image as its own PNG carrying its generation parameters")


def add_parsers(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run (with optional guidance)")
    add_sampling_args(s)
    s.add_argument("--n", type=positive_int, default=None, help="images to draw (default 64; 1 with --from-png)")
    s.add_argument("--from-png", default=None, metavar="PNG",
                   help="restore every setting from a PNG written with --png-dir (or by the UI, or AUTOMATIC1111); "
                        "flags given explicitly override")
    # DDPM with 10 steps: on the 20-minute MNIST run it beat DDIM-50 (domain score 5.3 vs 9.6, n=200) at a fifth
    # of the cost — 1000 samples in 42 s on 2 cores (README, "sample quality vs network evaluations").
    _add_png_args(s)
    s.set_defaults(func=cmd_sample)

    x = sub.add_parser("txt2img", help="draw images from a prompt (text-conditional runs)")
    add_sampling_args(x)
    x.add_argument("text", metavar="PROMPT", help='what to draw, e.g. "a pair of trousers"')
    x.add_argument("--n", type=positive_int, default=None, help="images to draw (default 16)")
    # Sampler, steps and guidance: the model's own defaults (pipelines/defaults.py: DPM++ 2M SDE-20 at guidance 2
    # for our text runs; LMS, 50 steps, guidance 7.5 for Stable Diffusion), unless given.
    _add_png_args(x)
    x.set_defaults(func=cmd_txt2img)

    e = sub.add_parser("img2img", help="edit images (SDEdit): noise them to --strength and denoise")
    add_sampling_args(e)
    e.add_argument("--input", required=True, help="an image file, or an .npz with 'images' N×H×W×C uint8")
    e.add_argument("--strength", type=finite_float(), default=0.6, help="in (0, 1]: how much noise, hence how much change")
    e.add_argument("--n", type=positive_int, default=None, help="outputs (default: one per input image)")
    e.set_defaults(func=cmd_img2img)

    i = sub.add_parser("inpaint", help="fill the white part of --mask, keep the rest of --input")
    add_sampling_args(i)
    i.add_argument("--input", required=True, help="an image file, or an .npz with 'images' N×H×W×C uint8")
    i.add_argument("--mask", required=True, help="black-and-white image: white = generate, black = keep")
    i.add_argument("--n", type=positive_int, default=None, help="outputs (default: one per input image)")
    i.add_argument("--strength", type=finite_float(), default=None,
                   help="inpainting U-Nets (SD's 9-channel model): start from the image noised to this level "
                        "(default 1: pure noise)")
    i.set_defaults(func=cmd_inpaint)

    n = sub.add_parser("interpolate", help="a path between two seeds (slerp of the starting noise)")
    add_sampling_args(n, outputs=False)
    n.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"))
    n.add_argument("--n", type=int_at_least(2), default=8, help="images on the path, ends included")
    n.add_argument("--labels", type=int, nargs="+", default=None, metavar="LABEL",
                   help="a class for the whole path, or two: the class moves from the first to the second")
    n.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                   help="text runs: a prompt for the whole path, or two: their embeddings are mixed along the path")
    n.set_defaults(func=cmd_interpolate)
