"""Stable Diffusion through noisecraft vs diffusers: wall time per image and peak memory, in one run.

    python benchmarks/stable_diffusion.py tiny            # the tiny random SD pipeline of the tests (64×64)
    python benchmarks/stable_diffusion.py full --size 256 --steps 4     # SD 1.5's real architecture, random weights
    python benchmarks/stable_diffusion.py memory --size 512 --repeats 2  # a U-Net step at 512, a VAE decode at 1024

Both libraries load the same diffusers folder (noisecraft into its own U-Net, VAE and CLIP text transformer) and
draw the same picture: same prompt, negative prompt, LMS with trailing spacing, guidance 7.5 and starting latents
(the image difference is printed). Each library runs in a fresh process (--repeats timed images after one warm-up),
the processes alternate (noisecraft, diffusers, noisecraft, ... --rounds each) so slow drifts of the machine hit
both, and the ratio is median(noisecraft) / median(diffusers) seconds per image (< 1: we are faster). Memory: the
process's resident set after loading, and the sampling peak above it (noisecraft.memory.PeakMemory: VmHWM, reset
through /proc/self/clear_refs) — activations and temporaries, warm-up included.

`full` builds SD 1.5's U-Net (860M parameters), VAE and CLIP ViT-L/14 text encoder with random weights (nothing
can be downloaded here), so the pictures are noise but time and memory are those of the real model; it also
measures noisecraft with bfloat16 weights, with attention slicing (1024 queries) and with VAE tiling.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from noisecraft.memory import PeakMemory, format_bytes  # noqa: E402
from noisecraft.pipelines.stable_diffusion import load_pipeline  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
RESULTS = Path(__file__).resolve().parent / "results"


def worker(args) -> int:
    """One library in a fresh process: load the folder, warm up, time --repeats images, report JSON on stdout.
    A fresh process per library, so neither sees the other's allocator caches in its peak memory."""
    import warnings
    warnings.filterwarnings("ignore")
    folder, size, steps = Path(args.folder), args.size, args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    if args.lib == "diffusers":
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def draw():
            with torch.no_grad():
                return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                            latents=z.clone(), height=size, width=size, output_type="pt").images * 2 - 1
    else:
        pipe = load_pipeline(folder)
        if args.variant == "bfloat16":
            pipe.set_precision("bfloat16")
        elif args.variant == "slicing":
            pipe.enable_attention_slicing(1024)
        elif args.variant == "tiling":
            pipe.enable_vae_tiling(tile_latent=32)
        sigma = float(pipe.schedule.sigmas[-1])
        start = z * sigma / (1 + sigma**2) ** 0.5    # diffusers' LMS starts at σ_max·z with trailing spacing

        def draw():
            with torch.no_grad():
                return pipe.sample(1, prompt=PROMPT, negative_prompt=NEGATIVE, sampler="lms", steps=steps,
                                   spacing="trailing", guidance=7.5, noise=start, height=size, width=size).images
    with PeakMemory("cpu") as memory:
        draw()                                                   # warm-up: first-call allocations, oneDNN plans
        seconds, image = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            image = draw()
            seconds.append(time.perf_counter() - t0)
    torch.save(image, Path(args.image_out))
    print(json.dumps({"seconds": seconds, "peak_bytes": memory.peak_bytes, "memory_method": memory.method,
                      "loaded_bytes": memory.start_bytes}))
    return 0


def run_worker(lib: str, folder: Path, size: int, steps: int, repeats: int, threads: int | None,
               variant: str = "") -> tuple[dict, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        image_out = Path(tmp) / "image.pt"
        cmd = [sys.executable, __file__, "_worker", "--lib", lib, "--folder", str(folder), "--size", str(size),
               "--steps", str(steps), "--repeats", str(repeats), "--image-out", str(image_out), "--variant", variant]
        if threads:
            cmd += ["--threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1]), torch.load(image_out)


def compare(folder: Path, size: int, steps: int, repeats: int, rounds: int, threads: int | None) -> dict:
    """Alternate the two libraries (rounds × one process each); per-image medians, their ratio, peak memory."""
    runs = {"noisecraft": [], "diffusers": []}
    peaks, loaded, images = {}, {}, {}
    for _ in range(rounds):
        for lib in runs:
            report, images[lib] = run_worker(lib, folder, size, steps, repeats, threads)
            runs[lib] += report["seconds"]
            peaks[lib] = max(peaks.get(lib, 0), report["peak_bytes"])
            loaded[lib] = report["loaded_bytes"]
    summary = {lib: {"seconds": secs, "median_seconds": statistics.median(secs), "peak_bytes": peaks[lib],
                     "loaded_bytes": loaded[lib]} for lib, secs in runs.items()}
    summary["ratio"] = summary["noisecraft"]["median_seconds"] / summary["diffusers"]["median_seconds"]
    summary["max_abs_image_diff"] = float((images["noisecraft"] - images["diffusers"]).abs().max())
    summary.update(size=size, steps=steps)
    return summary


def print_pair(title: str, r: dict) -> None:
    print(f"\n{title}: {r['size']}×{r['size']}, {r['steps']} LMS steps, guidance 7.5, batch 1")
    for name in ("noisecraft", "diffusers"):
        v = r[name]
        runs = ", ".join(f"{s:.2f}" for s in v["seconds"])
        print(f"  {name:10s} median {v['median_seconds']:.3f} s/image (runs {runs}); process after loading "
              f"{format_bytes(v['loaded_bytes'])}, sampling peak +{format_bytes(v['peak_bytes'])}")
    print(f"  ratio noisecraft/diffusers = {r['ratio']:.3f}   max |image difference| = {r['max_abs_image_diff']:.2e}")


def cmd_tiny(args) -> dict:
    from tiny_sd import save_tiny_pipeline
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_pipeline(Path(tmp) / "sd")
        result = compare(Path(tmp) / "sd", args.size or 64, args.steps or 20, args.repeats, args.rounds, args.threads)
    print_pair("tiny SD pipeline", result)
    return {"tiny": result}


def sd15_components():
    """SD 1.5's U-Net, VAE and text encoder configurations (from the published config.json files), random weights."""
    import diffusers
    import transformers
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2))
    return unet.eval(), vae.eval(), text.eval()


def save_sd15(folder: Path) -> int:
    import diffusers
    import transformers

    from noisecraft.models.tokenizer import CLIPTokenizer
    unet, vae, text = sd15_components()
    CLIPTokenizer.from_bpe_file().save(folder / "tokenizer_src")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_src")
    scheduler = diffusers.LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               timestep_spacing="trailing")
    ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.save_pretrained(folder)
    return sum(p.numel() for p in unet.parameters())


def cmd_full(args) -> dict:
    size, steps = args.size or 256, args.steps or 4
    out = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "sd15-random"
        params = save_sd15(folder)
        print(f"SD 1.5 architecture, random weights: U-Net {params / 1e6:.1f}M parameters")
        out["full"] = compare(folder, size, steps, args.repeats, args.rounds, args.threads)
        out["full"]["unet_parameters"] = params
        print_pair("SD 1.5 architecture (float32)", out["full"])
        variants = {}
        for variant in ("bfloat16", "slicing", "tiling"):
            report, _ = run_worker("noisecraft", folder, size, steps, args.repeats, args.threads, variant)
            variants[variant] = {**report, "median_seconds": statistics.median(report["seconds"])}
            print(f"  noisecraft {variant:9s} median {variants[variant]['median_seconds']:.3f} s/image, sampling peak "
                  f"+{format_bytes(report['peak_bytes'])}")
        out["variants"] = variants
    return out


def measure(args) -> int:
    """One measurement of noisecraft's SD 1.5 modules (random weights) in a fresh process: the U-Net at
    --size (batch 2, as classifier-free guidance runs it), with or without attention slicing, or the VAE
    decoder, with or without tiling. Prints JSON: seconds per call (median of --repeats after a warm-up), peak."""
    from noisecraft.convert.diffusers_unet import sd_unet_config
    from noisecraft.models.unet import UNet
    from noisecraft.models.vae import AutoencoderKL, VAEConfig
    from noisecraft.models.vae_tiling import tiled_decode
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latent = args.size // 8
    if args.variant.startswith("unet"):
        net = UNet(sd_unet_config("1.x")).eval()
        if args.variant == "unet-bf16":
            net.to(torch.bfloat16)
        if args.variant == "unet-sliced":
            from noisecraft.models.attention import set_attention_slicing
            set_attention_slicing(net, 1024)
        x, t, ctx = torch.randn(2, 4, latent, latent), torch.full((2,), 500.0), torch.randn(2, 77, 768)
        call = lambda: net(x, t, ctx)  # noqa: E731
    else:
        vae = AutoencoderKL(VAEConfig(in_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                                      layers_per_block=2, norm_groups=32)).eval()
        z = torch.randn(1, 4, args.vae_size // 8, args.vae_size // 8)
        call = (lambda: tiled_decode(vae, z, 64)) if args.variant == "vae-tiled" else (lambda: vae.decode(z))  # noqa: E731
    seconds = []
    with torch.no_grad(), PeakMemory("cpu") as memory:
        call()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - t0)
    size = args.size if args.variant.startswith("unet") else args.vae_size
    print(json.dumps({"variant": args.variant, "size": size, "seconds": seconds,
                      "median_seconds": statistics.median(seconds), "peak_bytes": memory.peak_bytes}))
    return 0


def cmd_memory(args) -> dict:
    """U-Net step and VAE decode of SD 1.5 at --size: plain, bfloat16, attention slicing, VAE tiling."""
    out = {}
    for variant in ("unet", "unet-sliced", "unet-bf16", "vae", "vae-tiled"):
        cmd = [sys.executable, __file__, "_measure", "--variant", variant, "--size", str(args.size or 512),
               "--vae-size", str(args.vae_size), "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
        report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        out[variant] = report
        print(f"  {variant:12s} {report['size']}×{report['size']}: {report['median_seconds']:.2f} s per call, peak +{format_bytes(report['peak_bytes'])} "
              f"above the loaded weights", flush=True)
    return {"memory": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["tiny", "full", "memory", "_worker", "_measure"])
    p.add_argument("--size", type=int, default=None, help="image height = width (tiny: 64, full: 256)")
    p.add_argument("--steps", type=int, default=None, help="LMS steps (tiny: 20, full: 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed images per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per library, alternating")
    p.add_argument("--tmp", default=None, help="full: where to write the 4 GB random checkpoint (default: system temp)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vae-size", type=int, default=1024, help="memory: image size of the VAE decode measurement")
    p.add_argument("--lib", default="noisecraft", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--image-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part == "_worker":
        return worker(args)
    if args.part == "_measure":
        return measure(args)
    result = {"tiny": cmd_tiny, "full": cmd_full, "memory": cmd_memory}[args.part](args)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": args.threads or torch.get_num_threads(),
                         "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"stable_diffusion_{args.part}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
