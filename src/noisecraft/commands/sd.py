"""Stable Diffusion checkpoint commands: `noisecraft convert`.

    noisecraft convert sd-v1-5.safetensors sd-v1-5-diffusers/            # single file -> diffusers folder
    noisecraft convert sd-v1-5-diffusers/ sd-v1-5.safetensors --dtype float16
    noisecraft convert runs/fashion-ldm fashion-diffusers/                # our latent text run -> diffusers

(Sampling from them is `noisecraft txt2img --model PATH "prompt"`, see cli.py.)
"""

from __future__ import annotations


def cmd_convert(args) -> int:
    from ..pipelines.stable_diffusion import convert, detect_format
    kind = detect_format(args.source)
    target = convert(args.source, args.target, to=args.to, dtype=args.dtype, config=args.config)
    print(f"converted {args.source} ({kind}) -> {target}")
    return 0


def add_parsers(sub) -> None:
    c = sub.add_parser("convert", help="convert a Stable Diffusion checkpoint (or a latent text run) between the "
                                       "diffusers folder and the original single-file layout")
    c.add_argument("source", help="a diffusers folder, a .safetensors/.ckpt single file, or a noisecraft latent run")
    c.add_argument("target", help="a folder (diffusers layout) or a .safetensors/.ckpt file (single-file layout)")
    c.add_argument("--to", choices=["diffusers", "single-file"], default=None,
                   help="the layout to write (default: from the target's name)")
    c.add_argument("--dtype", default=None, help="store the weights as float32 (default), float16 or bfloat16")
    c.add_argument("--config", default=None, metavar="FOLDER",
                   help="single-file source: take the configuration from this diffusers folder instead of SD's "
                        "conventions (for models with other head counts or GroupNorm groups)")
    c.set_defaults(func=cmd_convert)
