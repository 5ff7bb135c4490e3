"""The "Watch and learn" tab: the forward process of any picture with a slider over t, and the schedules. The
pictures come from learn.py (plain functions); this file only lays them out in Gradio."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np

from .engine import one_sentence

SCHEDULES = ["linear", "scaled_linear", "cosine"]


def _sample_picture() -> np.ndarray:
    """A picture to start from when none is uploaded: a white ring on black (64×64)."""
    y, x = np.mgrid[-1:1:64j, -1:1:64j]
    r = np.sqrt(x * x + y * y)
    ring = ((r > 0.45) & (r < 0.75)).astype(np.uint8) * 255
    return np.repeat(ring[..., None], 3, axis=-1)


def build_learn_tab(engine=None, library=None) -> None:
    from . import learn

    def forward(image, schedule, t, seed):
        try:
            picture, info = learn.forward_process_view(_sample_picture() if image is None else image, schedule,
                                                       int(t), seed=int(seed or 0))
        except Exception as e:      # noqa: BLE001 (a message, never a traceback)
            return None, f"⚠ {one_sentence(e)}"
        return picture, (f"t = {info['t']} · ᾱ_t = {info['alpha_bar']:.4f} · SNR_t = {info['snr']:.4g} · "
                         f"σ_t = {info['sigma']:.4g}")

    def schedules():
        try:
            return learn.schedules_figure()
        except Exception:           # noqa: BLE001
            return None

    gr.Markdown(learn.FORWARD_CAPTION)
    with gr.Row():
        with gr.Column():
            source = gr.Image(_sample_picture(), label="x_0 (upload any picture)", type="numpy", height=256,
                              elem_id="learn_source")
            schedule = gr.Dropdown(SCHEDULES, value="linear", label="β schedule", elem_id="learn_schedule")
            t = gr.Slider(0, 999, value=250, step=1, label="t", elem_id="learn_t")
            seed = gr.Number(0, label="noise seed", precision=0, elem_id="learn_seed")
        with gr.Column():
            xt = gr.Image(label="x_t ~ q(x_t | x_0)", type="numpy", interactive=False, height=256,
                          elem_id="learn_xt")
            numbers = gr.Markdown(elem_id="learn_numbers")
    inputs = [source, schedule, t, seed]
    for component in (t, schedule, seed):
        component.change(forward, inputs, [xt, numbers], api_name=False, concurrency_limit=None,
                         show_progress="hidden")
    source.change(forward, inputs, [xt, numbers], api_name="forward", concurrency_limit=None)
    with gr.Accordion("Schedules", open=False):
        gr.Markdown(learn.SCHEDULES_CAPTION)
        figure = gr.Image(label="β_t, ᾱ_t, σ_t, SNR_t", type="pil", interactive=False, elem_id="learn_schedules")
        gr.Button("Draw the schedules", elem_id="learn_draw").click(schedules, None, figure, api_name=False,
                                                                   concurrency_limit=None)

    if engine is None or library is None:
        return
    _trajectory_section(learn, engine, library)
    _latent_section(learn, engine, library)


def newest_picture(engine) -> np.ndarray | None:
    """The last picture the Create tab generated (the newest PNG in the output folder), or None."""
    from PIL import Image
    try:
        pngs = [p for p in engine.outputs.glob("*.png") if p.name[:5].isdigit()]
        if not pngs:
            return None
        with Image.open(max(pngs, key=lambda p: p.name)) as im:
            return np.asarray(im.convert("RGB"))
    except OSError:
        return None


def _latent_section(learn, engine, library) -> None:
    """For latent models: x, its reconstruction D(z) and the four channels of z = s·E(x) for an uploaded picture
    or the last generated one."""

    def show(model, image):
        try:
            pipe = engine.load(model)
            source = "the uploaded picture"
            if image is None:
                image, source = newest_picture(engine), "the last generated picture"
            if image is None:
                image, source = _sample_picture(), "a ring (upload a picture or generate one first)"
            picture, info = learn.latent_channels_view(pipe, image)
            return picture, (f"✓ {source}: z is {'×'.join(map(str, info['latent_shape']))}, mean "
                             f"{info['mean']:.3f}, std {info['std']:.3f}.")
        except Exception as e:      # noqa: BLE001 (a message, never a traceback)
            return None, f"⚠ {one_sentence(e)}"

    with gr.Accordion("Latent channels (latent models)", open=False):
        gr.Markdown(learn.LATENT_CAPTION, elem_id="learn_latent_caption")
        with gr.Row():
            model = gr.Dropdown([(e.label, str(e.path)) for e in library.scan()], label="Latent model",
                                allow_custom_value=True, elem_id="learn_latent_model")
            image = gr.Image(label="Picture (empty: the last generated one)", type="numpy", height=192,
                             elem_id="learn_latent_image")
        button = gr.Button("Encode and show the latent channels", elem_id="learn_latents")
        message = gr.Markdown(elem_id="learn_latent_status")
        view = gr.Image(label="x, D(z) and the channels z[0..3] of z = s·E(x)", type="pil", interactive=False,
                        elem_id="learn_latent_view")
        button.click(show, [model, image], [view, message], api_name="latents", concurrency_limit=1,
                     concurrency_id="job")


def _trajectory_section(learn, engine, library) -> None:
    """A generation's reverse process: x_t above x̂0 at every k-th step, as a strip and a GIF."""
    import tempfile

    def draw(model, prompt, label, steps, seed, every):
        try:
            pipe = engine.load(model)
            kwargs = {}
            if pipe.takes_prompts:
                kwargs["prompt"] = prompt or ""
            elif str(label or "").strip() not in ("", "none"):
                kwargs["label"] = int(str(label).split(":")[0])
            every = max(1, int(every or 1))
            result = pipe.sample(1, steps=int(steps) if steps else None, seed=int(seed or 0), save_every=every,
                                 **learn.TRAJECTORY_SAMPLER, **kwargs)
            gif = Path(tempfile.mkdtemp(prefix="noisecraft-ui-")) / "denoise.gif"
            return learn.trajectory_strip(result), str(learn.trajectory_gif(result, gif)), "✓ drawn"
        except Exception as e:      # noqa: BLE001 (a message, never a traceback)
            return None, None, f"⚠ {one_sentence(e)}"

    with gr.Accordion("The denoising trajectory of a generation", open=False):
        gr.Markdown(learn.TRAJECTORY_CAPTION)
        with gr.Row():
            model = gr.Dropdown([(e.label, str(e.path)) for e in library.scan()], label="Model",
                                allow_custom_value=True, elem_id="learn_model")
            prompt = gr.Textbox(label="Prompt (text models)", elem_id="learn_prompt")
            label = gr.Textbox("none", label="Class label (class models)", elem_id="learn_label")
        with gr.Row():
            steps = gr.Number(50, label="Steps", precision=0, elem_id="learn_steps")
            seed = gr.Number(0, label="Seed", precision=0, elem_id="learn_traj_seed")
            every = gr.Number(5, label="Keep every k steps", precision=0, elem_id="learn_every")
        button = gr.Button("Draw the trajectory", elem_id="learn_trajectory")
        message = gr.Markdown(elem_id="learn_traj_status")
        strip = gr.Image(label="x_t (top) and x̂0 (bottom)", type="pil", interactive=False, elem_id="learn_strip")
        gif = gr.Image(label="as a GIF", type="filepath", interactive=False, elem_id="learn_gif")
        button.click(draw, [model, prompt, label, steps, seed, every], [strip, gif, message], api_name="trajectory",
                     concurrency_limit=1, concurrency_id="job")
