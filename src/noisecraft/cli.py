"""The `noisecraft` command line: parse arguments, call the Python API, print where results went.

    noisecraft demo                      forward strip, a small model trained on bundled digits, grid + GIF
    noisecraft train --dataset mnist --out runs/mnist [--conditional] [--steps N | --minutes M] [--resume RUN]
    noisecraft train --dataset mnist --out runs/iddpm --learn-sigma [--loss hybrid|vlb] [--timestep-sampling importance]
    noisecraft train-vae --dataset mnist --out runs/vae            the autoencoder of latent diffusion
    noisecraft train-clip --dataset mnist --out runs/clip          a CLIP-style text encoder (contrastive)
    noisecraft train --dataset mnist --latent runs/vae --text-encoder runs/clip --out runs/ldm
    noisecraft txt2img runs/ldm "a handwritten digit seven" --guidance 4 --n 16 --grid out.png
    noisecraft sample RUN --n 64 --sampler ddim --steps 50 --seed 0 --out s.npz --grid g.png --gif d.gif
    noisecraft sample RUN ... --guide noisecraft.guidance.objectives:brightness --guide-scale 0.05 --guide-every 1
    noisecraft img2img RUN --input img.png --strength 0.6 --grid out.png
    noisecraft inpaint RUN --input img.png --mask mask.png --n 8 --grid out.png
    noisecraft interpolate RUN --seeds 0 1 --n 8 --grid path.png
    noisecraft viz forward|schedules ...
    noisecraft viz reverse RUN --save-every 5 --out strip.png --gif denoise.gif
    noisecraft txt2img --model sd-v1-5/ "an astronaut riding a horse" --grid astronaut.png
    noisecraft convert sd-v1-5.safetensors sd-v1-5-diffusers/
    noisecraft viz latents IMAGE --vae runs/vae --out latents.png
    noisecraft shard mnist|FOLDER --out shards/ --shard-size 1000   tar shards + manifest, for streaming
    noisecraft encode runs/vae --data shards/ --out latents/      VAE latents of shards, for train --latents

Errors a user can cause print one line ("noisecraft: error: ...") and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from .commands import clip, demo, distill, encode, evaluate, run_eval, sample, sd, shard, train, ui, vae, vdm, viz
from .errors import NoisecraftError

# The order of `noisecraft --help`: the story first (demo, train, sample and edit, pictures), then the parts of
# latent diffusion, Stable Diffusion checkpoints, evaluation and data preparation.
COMMAND_FAMILIES = (demo, train, distill, sample, viz, vae, clip, sd, evaluate, run_eval, vdm, shard, encode, ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noisecraft", description="Diffusion models made readable.")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in COMMAND_FAMILIES:
        family.add_parsers(sub)
    return parser


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
