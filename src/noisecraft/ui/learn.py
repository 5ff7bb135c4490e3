"""Watch and learn: pictures of the diffusion process for the UI, as plain functions (no gradio here).

Each view returns uint8 pictures (H×W×C numpy arrays or PIL images) and has a one-line caption constant naming
the equation it shows. The drawing itself is viz/'s (plot_schedules, trajectory_frames, reverse_pictures,
save_strip); this module only turns its files into pictures a web page can show.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import NoisecraftError

FORWARD_CAPTION = ("Forward process in closed form, q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I) (DDPM eq. 4): "
                   "x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, with SNR_t = ᾱ_t / (1 − ᾱ_t) and σ_t = √((1 − ᾱ_t) / ᾱ_t).")
SCHEDULES_CAPTION = ("Noise schedules: β_t, ᾱ_t = ∏_{s≤t}(1 − β_s) (DDPM eq. 4), σ_t = √((1 − ᾱ_t)/ᾱ_t) and "
                     "SNR_t = ᾱ_t/(1 − ᾱ_t) against t; cosine: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2) "
                     "(improved DDPM eq. 17).")
# The trajectory shows the algorithm its caption names, whatever the model's default sampler (pixel runs: DPM++ 2M SDE)
TRAJECTORY_SAMPLER = {"sampler": "ddpm", "spacing": "leading"}
TRAJECTORY_CAPTION = ("Reverse process p_θ(x_{t−1} | x_t) (DDPM Algorithm 2): x_t above the network's estimate "
                      "x̂_0 = (x_t − √(1 − ᾱ_t)·ε_θ(x_t, t)) / √ᾱ_t (DDPM eq. 15) at the saved steps.")
LATENT_CAPTION = ("Latent diffusion (Rombach et al. 2022, LDM eq. 2): the U-Net denoises z = s·E(x), the VAE "
                  "encoder's latent channels shown here, and the decoder D(z/s) ≈ x draws the picture.")

MIN_VIEW_PX = 192          # small images (8×8 digits) are enlarged, nearest neighbour, to at least this size


# --- images in, images out -----------------------------------------------------------------------

def as_tensor(image, channels: int | None = None) -> torch.Tensor:
    """A picture as a 1×C×H×W float tensor in [-1, 1]: a PIL image, an H×W(×C) uint8 array, or a tensor already in
    [-1, 1] (C×H×W or 1×C×H×W). `channels` (1 or 3) converts grey <-> RGB."""
    if torch.is_tensor(image):
        x = image.detach().float().cpu()
        x = x.unsqueeze(0) if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[0] != 1:
            raise NoisecraftError(f"give one image (C×H×W in [-1, 1]), got a tensor of shape {tuple(image.shape)}.")
    else:
        from PIL import Image
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise NoisecraftError(f"give an H×W×C uint8 picture (C = 1, 3 or 4), got {arr.dtype} of shape {arr.shape}.")
        arr = arr[..., None] if arr.ndim == 2 else arr[..., :3]
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1.0
    if 0 in x.shape:
        raise NoisecraftError("the picture is empty; give an image of at least 1×1 pixels.")
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(1, channels, *x.shape[2:]).clone()
        elif channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise NoisecraftError(f"cannot turn a {x.shape[1]}-channel picture into {channels} channels.")
    return x


def to_picture(x: torch.Tensor, min_px: int = MIN_VIEW_PX) -> np.ndarray:
    """One image in [-1, 1] (C×H×W or 1×C×H×W) as H×W×C uint8 (C = 1 becomes 3, for browsers), enlarged by an
    integer factor (nearest neighbour) until its longer side is at least min_px."""
    from ..viz.images import auto_scale, to_uint8
    arr = to_uint8(x.reshape(-1, *x.shape[-3:])[:1])[0]
    arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
    s = auto_scale(arr.shape[0], arr.shape[1], min_px)
    return arr.repeat(s, axis=0).repeat(s, axis=1) if s > 1 else arr


def _picture_from(write) -> Image.Image:   # noqa: F821
    """Call write(path) with a temporary PNG path (viz/ writes files) and return the picture, loaded."""
    from PIL import Image
    with tempfile.TemporaryDirectory(prefix="noisecraft-ui-") as folder:
        path = Path(folder) / "view.png"
        write(path)
        with Image.open(path) as im:
            return im.convert("RGB")


# --- the forward process -------------------------------------------------------------------------

def _schedule(schedule):
    from ..schedule import NoiseSchedule
    return NoiseSchedule.create(schedule) if isinstance(schedule, str) else schedule


def forward_process_view(image, schedule, t: int, seed: int = 0, min_px: int = MIN_VIEW_PX, max_side: int = 512):
    """x_t ~ q(x_t | x_0) of one picture at timestep t (the closed form, DDPM eq. 4), with a noise ε drawn from
    `seed` only, so a slider over t shows the same noise growing. Returns (x_t as an H×W×3 uint8 picture,
    {"t", "alpha_bar", "snr", "sigma"}). schedule: a NoiseSchedule or a name (linear, scaled_linear, cosine).
    Pictures larger than max_side are first shrunk to it (the slider stays quick on a large photo)."""
    schedule = _schedule(schedule)
    T = schedule.T
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < T:
        raise NoisecraftError(f"t must be an integer timestep in [0, {T - 1}], got {t!r}.")
    t = int(t)
    x0 = as_tensor(image)
    h, w = x0.shape[-2:]
    if max_side and max(h, w) > max_side:
        size = (max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w))))
        x0 = torch.nn.functional.interpolate(x0, size=size, mode="bilinear", antialias=True,
                                             align_corners=False).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xt = schedule.q_sample(x0, torch.tensor([t]), noise)
    a = float(schedule.alphas_cumprod[t])
    info = {"t": t, "alpha_bar": a, "snr": a / (1.0 - a) if a < 1 else math.inf,
            "sigma": math.sqrt((1.0 - a) / a) if a > 0 else math.inf}
    return to_picture(xt, min_px), info


def schedules_figure(schedules=("linear", "scaled_linear", "cosine"), T: int = 1000):
    """β_t, ᾱ_t, σ_t and SNR_t of the named schedules (or a {label: NoiseSchedule} dict) side by side, as a PIL
    image (viz.plots.plot_schedules)."""
    from ..viz.plots import plot_schedules
    if not isinstance(schedules, dict):
        from ..schedule import NoiseSchedule
        schedules = {name: NoiseSchedule.create(name, T) for name in schedules}
    return _picture_from(lambda path: plot_schedules(schedules, path))


# --- the reverse process of a generation ---------------------------------------------------------

def _trajectory(result):
    trajectory = getattr(result, "trajectory", result)
    if not trajectory:
        raise NoisecraftError("this generation kept no steps; draw it with save_every = k > 0 to see its "
                              "denoising trajectory.")
    return trajectory


def trajectory_strip(result, index: int = 0):
    """x_t above x̂_0 at every saved step of image `index` of a SampleResult drawn with save_every > 0 (or of its
    trajectory list), as a captioned PIL image (viz.process.reverse_pictures)."""
    from ..viz.process import reverse_pictures
    trajectory = _trajectory(result)
    count = trajectory[0]["preview"].shape[0]
    if not 0 <= index < min(count, 16):
        raise NoisecraftError(f"image {index} has no trajectory; the first {min(count, 16)} images keep one.")
    return _picture_from(lambda path: reverse_pictures(trajectory, strip_path=path, index=index))


def trajectory_gif(result, path) -> Path:
    """The denoising of the first images of a SampleResult (save_every > 0) as an animated GIF at `path`, with
    x_t per frame and its step and σ as caption (viz.process.reverse_pictures). Returns the path."""
    from ..viz.process import reverse_pictures
    return reverse_pictures(_trajectory(result), gif_path=path)[0]


# --- latent models -------------------------------------------------------------------------------

@torch.no_grad()
def latent_channels_view(pipe, image, min_px: int = 96):
    """For a latent model: the picture as the model sees it (resized), its reconstruction D(z/s), and each
    channel of z = s·E(x) (the posterior mean), every channel stretched to its own min..max, as one captioned
    PIL image. Returns (picture, {"latent_shape", "mean", "std"} of z)."""
    from ..viz.images import auto_scale, save_strip
    if getattr(pipe, "vae", None) is None:
        raise NoisecraftError("this model works in pixel space and has no latent channels; pick a latent model "
                              "(trained with --latent, or Stable Diffusion).")
    c, h, w = pipe.image_shape
    x = as_tensor(image, c)
    if tuple(x.shape[-2:]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(-1, 1)
    device = next(pipe.vae.parameters()).device
    z = pipe.encode(x.to(device)).float()
    recon = pipe.decode(z).clamp(-1, 1).cpu()
    z = z.cpu()[0]
    lo, hi = z.amin(dim=(1, 2), keepdim=True), z.amax(dim=(1, 2), keepdim=True)
    channels = ((z - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1).unsqueeze(1)            # L×1×h×w in [-1, 1]
    # one row of cells of one size: the latents enlarged by the VAE's factor, next to x and D(z)
    f = h // z.shape[-2]
    channels = channels.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)[..., :h, :w]
    if c == 3:
        channels = channels.expand(-1, 3, -1, -1)
    cells = torch.cat([x, recon, channels])
    captions = ["x", "D(z)"] + [f"z[{i}]" for i in range(z.shape[0])]
    scale = auto_scale(h, w, min_px)
    picture = _picture_from(lambda path: save_strip(cells, path, captions=captions, scale=scale))
    return picture, {"latent_shape": tuple(z.shape), "mean": float(z.mean()), "std": float(z.std())}


# --- the tab's handlers (plain functions; build_tab wires them to Gradio) -------------------------

def dataset_image(name: str = "digits", index: int = 0) -> np.ndarray:
    """Image `index` of a dataset (the bundled digits need no download) as H×W×C uint8."""
    from ..data.datasets import load_dataset
    data = load_dataset(name, download=False)
    if not 0 <= int(index) < len(data.images):
        raise NoisecraftError(f"{name} has {len(data.images)} images; pick an index in [0, {len(data.images) - 1}].")
    return data.images[int(index)].permute(1, 2, 0).numpy()


def forward_panel(image, schedule: str, t: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(x_t picture, a Markdown line with t, ᾱ_t, SNR and σ_t) for the slider; no image: the first digit."""
    if image is None:
        image = dataset_image()
    picture, info = forward_process_view(image, schedule, int(t), int(seed or 0))
    return picture, (f"t = {info['t']}: ᾱ_t = {info['alpha_bar']:.4f}, SNR = {info['snr']:.4g}, "
                     f"σ_t = {info['sigma']:.4g}")


def trajectory_panel(pipe, steps: int = 20, seed: int = 0, prompt: str | None = None, label=None,
                     gif_path=None, frames: int = 10):
    """Draw one image with about `frames` saved steps: (strip picture, GIF path or None, SampleResult)."""
    steps = int(steps)
    if not 1 <= steps <= 1000:
        raise NoisecraftError(f"steps must be between 1 and 1000, got {steps}.")
    cond = {}
    if pipe.takes_prompts:
        cond["prompt"] = prompt or ""
    elif label not in (None, ""):
        cond["label"] = int(label)
    result = pipe.sample(1, steps=steps, seed=int(seed or 0), save_every=max(1, steps // max(1, frames)),
                         **TRAJECTORY_SAMPLER, **cond)
    gif = trajectory_gif(result, gif_path) if gif_path else None
    return trajectory_strip(result), gif, result


def build_tab(engine, library) -> None:
    """The "Watch and learn" tab, inside a gr.Blocks being built (app.py calls it). Gradio is imported here only."""
    import gradio as gr

    from .engine import one_sentence

    def models():
        return [(entry.label, str(entry.path)) for entry in library.scan()]

    def forward(image, schedule, t, seed):
        try:
            return forward_panel(image, schedule, t, seed)
        except Exception as e:      # noqa: BLE001 (a message, never a traceback)
            return None, f"⚠ {one_sentence(e)}"

    def trajectory(model, steps, seed, prompt, label):
        try:
            pipe = engine.load(model)
            folder = engine.outputs / ".learn"
            folder.mkdir(parents=True, exist_ok=True)
            strip, gif, _ = trajectory_panel(pipe, steps, seed, prompt, label or None,
                                             gif_path=folder / f"trajectory-{int(seed or 0)}.gif")
            return strip, str(gif), "✓ x_t (top) and x̂_0 (bottom) at the saved steps."
        except Exception as e:      # noqa: BLE001
            return None, None, f"⚠ {one_sentence(e)}"

    def latents(model, image):
        try:
            pipe = engine.load(model)
            picture, info = latent_channels_view(pipe, image if image is not None else dataset_image())
            return picture, (f"✓ z is {'×'.join(map(str, info['latent_shape']))}, mean {info['mean']:.3f}, "
                             f"std {info['std']:.3f}.")
        except Exception as e:      # noqa: BLE001
            return None, f"⚠ {one_sentence(e)}"

    with gr.Accordion("Forward process q(x_t | x_0)", open=True):
        gr.Markdown(FORWARD_CAPTION)
        with gr.Row():
            with gr.Column():
                source = gr.Image(label="x_0 (upload; empty: a digit)", type="numpy", height=256,
                                  elem_id="learn-x0")
                schedule = gr.Dropdown(["linear", "scaled_linear", "cosine"], value="linear", label="Schedule",
                                       elem_id="learn-schedule")
                t = gr.Slider(0, 999, value=250, step=1, label="t", elem_id="learn-t")
                seed = gr.Number(0, precision=0, label="Noise seed", elem_id="learn-seed")
            with gr.Column():
                xt = gr.Image(label="x_t", type="numpy", interactive=False, height=256, elem_id="learn-xt")
                numbers = gr.Markdown(elem_id="learn-numbers")
        for control in (t, schedule, seed, source):
            control.change(forward, [source, schedule, t, seed], [xt, numbers], api_name=False,
                           concurrency_limit=None, show_progress="hidden")
    with gr.Accordion("Noise schedules", open=False):
        gr.Markdown(SCHEDULES_CAPTION)
        gr.Image(value=schedules_figure(), type="pil", interactive=False, show_label=False, elem_id="learn-schedules")
    with gr.Accordion("Denoising trajectory of a generation", open=False):
        gr.Markdown(TRAJECTORY_CAPTION)
        with gr.Row():
            model = gr.Dropdown(models(), label="Model", elem_id="learn-model")
            steps = gr.Number(20, precision=0, label="Steps")
            traj_seed = gr.Number(0, precision=0, label="Seed")
            prompt = gr.Textbox(label="Prompt (text models)")
            label = gr.Textbox(label="Label (class models)")
        run = gr.Button("Denoise and show", elem_id="learn-trajectory")
        note = gr.Markdown()
        strip = gr.Image(label="x_t and x̂_0", type="pil", interactive=False)
        gif = gr.Image(label="GIF", type="filepath", interactive=False)
        run.click(trajectory, [model, steps, traj_seed, prompt, label], [strip, gif, note], api_name="trajectory",
                  concurrency_limit=1, concurrency_id="job")
    with gr.Accordion("Latent channels (latent models)", open=False):
        gr.Markdown(LATENT_CAPTION)
        with gr.Row():
            latent_model = gr.Dropdown(models(), label="Latent model")
            latent_image = gr.Image(label="Image (empty: a digit)", type="numpy", height=192)
        show = gr.Button("Encode and show")
        latent_note = gr.Markdown()
        latent_view = gr.Image(label="x, D(z) and the channels of z", type="pil", interactive=False)
        show.click(latents, [latent_model, latent_image], [latent_view, latent_note], api_name="latents",
                   concurrency_limit=1, concurrency_id="job")
