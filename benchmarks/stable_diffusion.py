"""Stable Diffusion through noisecraft vs diffusers: wall time per image and peak memory, in one process.

    python benchmarks/stable_diffusion.py tiny            # the tiny random SD pipeline of the tests (64×64)
    python benchmarks/stable_diffusion.py full --size 256 --steps 4     # SD 1.5's real architecture, random weights

Both pipelines get the same components (diffusers/transformers modules, and the same weights loaded into
noisecraft's own U-Net, VAE and CLIP text transformer), the same prompt, negative prompt, scheduler (LMS, leading
spacing), guidance 7.5 and starting latents. Runs alternate (noisecraft, diffusers, noisecraft, ...) so slow
drifts of the machine hit both; the ratio is median(noisecraft) / median(diffusers) per image (< 1: we are faster).
Peak memory is the process's resident-set high-water mark above the level at the start of each run
(noisecraft.memory.PeakMemory, VmHWM reset through /proc/self/clear_refs), i.e. the activations and temporaries
of sampling, the weights of both libraries already loaded.

`full` builds SD 1.5's U-Net (860M parameters), VAE and CLIP ViT-L/14 text encoder with random weights (no
download is possible here), so the pictures are noise, but time and memory are those of the real model. It also
measures noisecraft with bfloat16 weights, with attention slicing, and the VAE decoder with and without tiling at
--tile-size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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


def timed(fn):
    with PeakMemory("cpu") as memory:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, memory.peak_bytes


def compare(ours_fn, theirs_fn, repeats: int) -> dict:
    """Alternate the two, keep per-run seconds and peak bytes, check they draw the same picture."""
    runs = {"noisecraft": [], "diffusers": []}
    images = {}
    ours_fn(), theirs_fn()                                     # warm-up (first-call allocations, oneDNN plans)
    for _ in range(repeats):
        for name, fn in (("noisecraft", ours_fn), ("diffusers", theirs_fn)):
            images[name], seconds, peak = timed(fn)
            runs[name].append((seconds, peak))
    summary = {}
    for name, values in runs.items():
        seconds = [s for s, _ in values]
        summary[name] = {"seconds": seconds, "median_seconds": statistics.median(seconds),
                         "peak_bytes": max(p for _, p in values)}
    summary["ratio"] = summary["noisecraft"]["median_seconds"] / summary["diffusers"]["median_seconds"]
    summary["max_abs_image_diff"] = float((images["noisecraft"] - images["diffusers"]).abs().max())
    return summary


def run_pair(folder: Path, ref, size: int, steps: int, repeats: int, extra: dict | None = None) -> dict:
    pipe = load_pipeline(folder)
    latent = size // pipe.downsample_factor
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))

    def ours():
        with torch.no_grad():
            return pipe.sample(1, prompt=PROMPT, negative_prompt=NEGATIVE, sampler="lms", steps=steps,
                               spacing="trailing", guidance=7.5, noise=z, height=size, width=size).images

    def theirs():
        with torch.no_grad():
            out = ref(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                      latents=z.clone(), height=size, width=size, output_type="pt").images
        return out * 2 - 1

    result = compare(ours, theirs, repeats)
    result.update(size=size, steps=steps, **(extra or {}))
    return result


def print_pair(title: str, r: dict) -> None:
    print(f"\n{title}: {r['size']}×{r['size']}, {r['steps']} LMS steps, guidance 7.5, batch 1")
    for name in ("noisecraft", "diffusers"):
        v = r[name]
        runs = ", ".join(f"{s:.2f}" for s in v["seconds"])
        print(f"  {name:10s} median {v['median_seconds']:.3f} s/image (runs {runs}); peak +{format_bytes(v['peak_bytes'])}")
    print(f"  ratio noisecraft/diffusers = {r['ratio']:.3f}   max |image difference| = {r['max_abs_image_diff']:.2e}")


def cmd_tiny(args) -> dict:
    from tiny_sd import save_tiny_pipeline
    with tempfile.TemporaryDirectory() as tmp:
        ref = save_tiny_pipeline(Path(tmp) / "sd")
        result = run_pair(Path(tmp) / "sd", ref, args.size or 64, args.steps or 20, args.repeats)
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


def cmd_full(args) -> dict:
    import diffusers
    import transformers

    from noisecraft.models.tokenizer import CLIPTokenizer
    from noisecraft.models.vae_tiling import tiled_decode
    size, steps = args.size or 256, args.steps or 4
    out = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "sd15-random"
        unet, vae, text = sd15_components()
        CLIPTokenizer.from_bpe_file().save(folder / "tokenizer")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = diffusers.LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   timestep_spacing="trailing")
        ref = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        ref.save_pretrained(folder)
        params = sum(p.numel() for p in unet.parameters())
        print(f"SD 1.5 architecture, random weights: U-Net {params / 1e6:.1f}M parameters; {torch.get_num_threads()} threads")
        out["full"] = run_pair(folder, ref, size, steps, args.repeats, {"unet_parameters": params})
        print_pair("SD 1.5 architecture (float32)", out["full"])

        # noisecraft alone: bfloat16 weights, attention slicing; VAE decode with and without tiling.
        z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        variants = {}
        for name, setup in (("float32", lambda p: p), ("bfloat16", lambda p: p.set_precision("bfloat16")),
                            ("attention slicing 1024", lambda p: p.enable_attention_slicing(1024))):
            pipe = setup(load_pipeline(folder))

            def draw(pipe=pipe):
                with torch.no_grad():
                    return pipe.sample(1, prompt=PROMPT, negative_prompt=NEGATIVE, sampler="lms", steps=steps,
                                       spacing="trailing", guidance=7.5, noise=z, height=size, width=size).images
            draw()
            samples = [timed(draw) for _ in range(args.repeats)]
            variants[name] = {"median_seconds": statistics.median(s for _, s, _ in samples),
                              "peak_bytes": max(p for _, _, p in samples)}
            print(f"  noisecraft {name:24s} {variants[name]['median_seconds']:.3f} s/image, "
                  f"peak +{format_bytes(variants[name]['peak_bytes'])}")
            del pipe
        out["variants"] = variants
        pipe = load_pipeline(folder)
        big = torch.randn(1, 4, args.tile_size // 8, args.tile_size // 8, generator=torch.Generator().manual_seed(1))
        decode = {}
        for name, fn in (("untiled", lambda: pipe.vae.decode(big)), ("tiled 64", lambda: tiled_decode(pipe.vae, big, 64))):
            with torch.no_grad():
                _, seconds, peak = timed(fn)
            decode[name] = {"seconds": seconds, "peak_bytes": peak}
            print(f"  VAE decode {args.tile_size}×{args.tile_size} {name:9s} {seconds:.2f} s, peak +{format_bytes(peak)}")
        out["vae_decode"] = {"size": args.tile_size, **decode}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["tiny", "full"])
    p.add_argument("--size", type=int, default=None, help="image height = width (tiny: 64, full: 256)")
    p.add_argument("--steps", type=int, default=None, help="LMS steps (tiny: 20, full: 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tile-size", type=int, default=768, help="full: image size of the VAE tiling measurement")
    p.add_argument("--tmp", default=None, help="full: where to write the 4 GB random checkpoint (default: system temp)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = cmd_tiny(args) if args.part == "tiny" else cmd_full(args)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"stable_diffusion_{args.part}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
