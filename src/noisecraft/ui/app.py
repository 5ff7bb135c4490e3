"""The Gradio app of `noisecraft ui`: build_app(library, engine) -> gr.Blocks.

Create: the model, its settings and the Generate / Edit sub-tabs on the left; the live preview, progress, Cancel and
the gallery of results on the right. Watch and learn, and Train, come from learn.py and training.py when present.
Every handler answers with a message, never a traceback, and one generation runs at a time (the queue shows the
position of the others).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported: no telemetry, ever

import gradio as gr
import numpy as np

from ..errors import NoisecraftError
from ..samplers import sampler_names
from .engine import Engine, Job, one_sentence, takes_eta
from .library import ModelLibrary

GALLERY_KEEP = 48            # thumbnails a session's gallery keeps (the PNGs stay on disk)
CANCEL_WAIT_S = 5.0          # how long Cancel waits for the sampler to stop (one step) before answering
DEFAULT = "model default"
NONE = "none"


def _label_value(text) -> int | None:
    """"none" / "" -> None; "3: three" or "3" -> 3."""
    text = str(text if text is not None else "").strip()
    if not text or text.lower() == NONE:
        return None
    head = text.split(":", 1)[0].strip()
    try:
        return int(float(head))
    except ValueError:
        raise NoisecraftError(f"a label is a class number such as 3, got {text!r}.") from None


def _int_or_none(value) -> int | None:
    if value is None or value == "":
        return None
    value = int(float(value))
    return value if value > 0 else None


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def _status(kind: str, text: str) -> str:
    icon = {"error": "⚠", "ok": "✓", "info": "ℹ", "run": "▶", "cancel": "■"}[kind]   # glyphs every font has
    return f"{icon} {text}"


def build_app(library: ModelLibrary, engine: Engine, threads: tuple[int, int] | None = None) -> gr.Blocks:
    samplers = [DEFAULT] + sampler_names()

    def model_choices():
        return [(entry.label, str(entry.path)) for entry in library.scan()]

    def job_from(model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta, seed, batch,
                 height, width, preview_every, prompt_b=None, mix=0.0, **extra) -> Job:
        sampler = None if not sampler or sampler == DEFAULT else sampler
        return Job(prompt_b=prompt_b or None, mix=float(mix or 0), model=model, prompt=prompt or None, negative_prompt=negative_prompt or None,
                   label=_label_value(label), negative_label=_label_value(negative_label), sampler=sampler,
                   steps=_int_or_none(steps), guidance=None if guidance is None else float(guidance),
                   eta=None if eta is None or float(eta) < 0 else float(eta), seed=-1 if seed is None else int(seed),
                   n=int(batch or 1), height=_int_or_none(height), width=_int_or_none(width),
                   preview_every=int(preview_every or 0), **extra)

    def stream(job: Job, gallery: list, request: gr.Request | None, progress):
        """The updates of one job: (preview, status, gallery, gallery state, last seed)."""
        gallery = list(gallery or [])
        skip = gr.skip()
        try:
            events = engine.run(job, owner=_session(request))
            yield None, _status("run", "starting…"), skip, skip, skip
            for event in events:
                kind = event[0]
                if kind == "progress":
                    _, step, total, left = event
                    progress((step, total), desc=f"step {step}/{total}")
                    yield skip, _status("run", f"step {step}/{total} · about {left:.1f} s left"), skip, skip, skip
                elif kind == "preview":
                    yield event[1], skip, skip, skip, skip
                elif kind == "done":
                    _, items, seed = event
                    gallery = ([(str(i.thumb), i.caption, str(i.image)) for i in items] + gallery)[:GALLERY_KEEP]
                    shown = [(thumb, caption) for thumb, caption, _ in gallery]
                    where = items[0].image.parent if items else engine.outputs
                    final = str(items[0].thumb) if items else skip          # the preview ends on the result
                    yield (final, _status("ok", f"done: {len(items)} image(s), seed {seed}, saved in {where}"),
                           shown, gallery, seed)
                elif kind == "cancelled":
                    _, step, total = event
                    yield skip, _status("cancel", f"cancelled after step {step} of {total}"), skip, skip, skip
                elif kind == "error":
                    yield skip, _status("error", event[1]), skip, skip, skip
        except Exception as e:      # noqa: BLE001 (a message, never a traceback)
            yield skip, _status("error", one_sentence(e)), skip, skip, skip

    settings_inputs = []

    def generate(model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta, seed, batch,
                 height, width, preview_every, prompt_b, mix, gallery, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008 (how Gradio asks for it)
        values = (model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta, seed, batch,
                  height, width, preview_every, prompt_b, mix)
        try:
            job = job_from(*values)
        except (NoisecraftError, ValueError, TypeError) as e:
            yield gr.skip(), _status("error", one_sentence(e)), gr.skip(), gr.skip(), gr.skip()
            return
        yield from stream(job, gallery, request, progress)

    def edit(model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta, seed, batch,
             height, width, preview_every, prompt_b, mix, gallery, editor, mode, strength, request: gr.Request,
             progress=gr.Progress()):  # noqa: B008 (how Gradio asks for it)
        values = (model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta, seed, batch,
                  height, width, preview_every, prompt_b, mix)
        try:
            image, mask = editor_arrays(editor)
            kind = "inpaint" if str(mode).lower().startswith("inpaint") else "img2img"
            job = job_from(*values, kind=kind, image=image, mask=mask, strength=float(strength))
        except (NoisecraftError, ValueError, TypeError) as e:
            yield gr.skip(), _status("error", one_sentence(e)), gr.skip(), gr.skip(), gr.skip()
            return
        yield from stream(job, gallery, request, progress)

    def interpolate(model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta, seed, batch,
                    height, width, preview_every, prompt_b, mix, seed_b, frames, end_prompt, end_label):
        """A strip of `frames` pictures from `seed`'s to `seed_b`'s (slerp of the starting noise), the prompt or
        the class moving too when an end prompt / end label is given (pipe.interpolate_seeds)."""
        try:
            job = job_from(model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta, seed,
                           batch, height, width, 0)
            pipe = engine.load(job.model)
            frames = int(frames or 0)
            if not 2 <= frames <= 16:
                raise NoisecraftError(f"the strip takes 2 to 16 pictures, got {frames}.")
            seed_a = max(job.seed, 0)
            seed_b = int(seed_b if seed_b is not None else seed_a + 1)
            kw = {"sampler": job.sampler, "steps": job.steps, "guidance": job.guidance, "height": job.height,
                  "width": job.width}
            if job.eta is not None and job.sampler and takes_eta(job.sampler):
                kw["eta"] = job.eta
            if pipe.takes_prompts:
                kw.update(prompt=job.prompt or "", negative_prompt=job.negative_prompt,
                          prompt_b=str(end_prompt) if end_prompt else None)
            elif job.prompt or end_prompt:
                raise NoisecraftError("this model is not text-conditional, so it takes no prompt; use the labels.")
            else:
                kw.update(label=job.label, negative_label=job.negative_label, label_b=_label_value(end_label))
            result = pipe.interpolate_seeds(seed_a, seed_b, frames, **kw)
            strip = interpolation_strip(result.images)
            end = (f" and from “{job.prompt or ''}” to “{end_prompt}”" if kw.get("prompt_b") else
                   f" and from label {kw['label']} to {kw['label_b']}" if kw.get("label_b") is not None else "")
            return strip, _status("ok", f"{frames} pictures from seed {seed_a} to seed {seed_b}{end}.")
        except Exception as e:      # noqa: BLE001 (a message, never a traceback)
            return gr.skip(), _status("error", one_sentence(e))

    def cancel(request: gr.Request):
        # Wait (briefly) for the sampler to stop and answer with the final word: this reply and the job's own last
        # status can reach the page in either order, and a bare "cancelling…" arriving last would stay forever.
        if engine.cancel(_session(request), wait=CANCEL_WAIT_S):
            if engine.cancelled_at is not None:
                step, total = engine.cancelled_at
                return _status("cancel", f"cancelling… done: cancelled after step {step} of {total}")
            if engine.stopped:          # it finished before the cancel reached it: its "done" stays
                return gr.skip()
            return _status("cancel", "cancelling… (stops after the current step)")
        return _status("info", "nothing of yours is running.")

    def load_model(model):
        """Load the chosen model and fit the form to it."""
        keep = [gr.skip()] * 14
        if not model:
            return [_status("info", f"no model chosen; models are searched under {library.describe()}.")] + keep
        try:
            info = engine.describe(engine.load(model))
        except Exception as e:      # noqa: BLE001
            return [_status("error", one_sentence(e))] + keep
        text, classes = info["text"], info["classes"]
        names = info["class_names"]
        labels = [NONE] + [f"{i}: {names[i]}" if i < len(names) and names[i] != str(i) else str(i)
                           for i in range(classes)]
        kind = "text-to-image" if text else (f"{classes} classes" if classes else "unconditional")
        message = (f"loaded {engine.pipe_path.name}: {kind}, {info['channels']}×{info['height']}×{info['width']} "
                   f"images; defaults {info['sampler']}, {info['steps']} steps, guidance {info['guidance']:g}")
        m = info["multiple"]
        return [_status("ok", message),
                gr.update(visible=text), gr.update(visible=text),
                gr.update(visible=bool(classes), choices=labels, value=NONE),
                gr.update(visible=bool(classes), choices=labels, value=NONE),
                gr.update(value=info["sampler"]), gr.update(value=info["steps"]), gr.update(value=info["guidance"]),
                gr.update(value=info["height"], step=m, minimum=m), gr.update(value=info["width"], step=m, minimum=m),
                gr.update(visible=takes_eta(info["sampler"])), gr.skip(), gr.update(visible=text),
                gr.update(visible=text), gr.update(visible=bool(classes), choices=labels, value=NONE)]

    def refresh():
        choices = model_choices()
        return gr.update(choices=choices), _status("info", f"{len(choices)} model(s) under {library.describe()}")

    def sampler_changed(sampler):
        return gr.update(visible=sampler == DEFAULT or takes_eta(sampler))

    def reuse_seed(last):
        return last if last is not None else -1

    def select(gallery, evt: gr.SelectData):
        gallery = gallery or []
        if evt is None or not 0 <= evt.index < len(gallery):
            return None
        return gallery[evt.index][2]

    def send_to_edit(selected):
        if not selected:
            return gr.skip(), gr.skip(), _status("info", "click a picture in the gallery first.")
        value = {"background": selected, "layers": [], "composite": selected}
        return value, gr.Tabs(selected="edit"), _status("info", "sent to Edit: paint the area to regenerate for "
                                                               "inpainting, or set the strength for img2img.")

    def restore(file):
        """Every setting stored in a PNG noisecraft wrote (or the `parameters` of another tool)."""
        outputs = 14
        if file is None:
            return [gr.skip()] * outputs
        try:
            from ..io.png_params import read_png_params
            p = read_png_params(file if isinstance(file, str) else getattr(file, "name", file))
        except Exception as e:      # noqa: BLE001
            return [_status("error", one_sentence(e))] + [gr.skip()] * (outputs - 1)
        seed = p.get("seed")
        if seed is not None:
            seed = int(seed) + int(p.get("index") or 0)      # this picture's own seed
        model = gr.skip()
        if p.get("model"):
            try:
                model = str(library.resolve(p["model"]))
            except NoisecraftError:
                model = gr.skip()

        def value(key, convert=lambda v: v):
            return gr.skip() if p.get(key) is None else convert(p[key])

        return [_status("ok", "settings restored from the picture; press Generate for the same image."), model,
                value("prompt"), value("negative_prompt"), value("label", str), value("negative_label", str),
                value("sampler"), value("steps"), value("guidance"), seed if seed is not None else gr.skip(),
                value("height"), value("width"), p.get("mix_prompt") or "", float(p.get("mix") or 0.0)]

    # delete_cache: Gradio's copies of previews and thumbnails older than an hour are removed every hour, so a long
    # session does not fill the disk either (the PNGs themselves stay in the output folder).
    with gr.Blocks(title="noisecraft", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("## noisecraft — diffusion models made readable")
        last_seed = gr.State(None)
        gallery_state = gr.State([])
        selected = gr.State(None)
        with gr.Tabs(selected="create") as top:
            with gr.Tab("Create", id="create"), gr.Row():
                with gr.Column(scale=1):
                    with gr.Row():
                        model = gr.Dropdown(model_choices(), label="Model", allow_custom_value=True,
                                            info=f"runs and checkpoints under {library.describe()}",
                                            scale=5, elem_id="model")
                        refresh_btn = gr.Button("↻", scale=0, min_width=40, elem_id="refresh")
                    prompt = gr.Textbox(label="Prompt", lines=2, visible=False, elem_id="prompt")
                    negative_prompt = gr.Textbox(label="Negative prompt", visible=False, elem_id="negative")
                    with gr.Row(visible=False) as mixing:
                        prompt_b = gr.Textbox(label="Mix in a second prompt (pipe.mix_prompts)", scale=3,
                                              elem_id="prompt_b")
                        mix = gr.Slider(0, 1, value=0, step=0.05, label="Weight of the second prompt", scale=2,
                                        elem_id="mix")
                    with gr.Row():
                        label = gr.Dropdown([NONE], value=NONE, label="Class label", allow_custom_value=True,
                                            visible=False, elem_id="label")
                        negative_label = gr.Dropdown([NONE], value=NONE, label="Negative label",
                                                     allow_custom_value=True, visible=False, elem_id="neglabel")
                    with gr.Row():
                        sampler = gr.Dropdown(samplers, value=DEFAULT, label="Sampler", elem_id="sampler")
                        steps = gr.Number(None, label="Steps", precision=0, minimum=0, maximum=1000,
                                          elem_id="steps")
                        guidance = gr.Number(None, label="Guidance (CFG)", minimum=0, maximum=50, step=0.5,
                                             elem_id="guidance")
                    eta = gr.Number(-1, label="η (-1: the sampler's default)", minimum=-1, maximum=1, step=0.05,
                                    elem_id="eta")
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="seed")
                        reuse = gr.Button("♻ last seed", scale=0, min_width=90, elem_id="reuse")
                        batch = gr.Slider(1, 16, value=1, step=1, label="Batch size", elem_id="batch")
                    with gr.Row():
                        height = gr.Number(None, label="Height", precision=0, elem_id="height")
                        width = gr.Number(None, label="Width", precision=0, elem_id="width")
                        preview_every = gr.Slider(0, 20, value=2, step=1, label="Preview every k steps",
                                                  elem_id="preview_every")
                    with gr.Tabs(selected="generate") as modes:
                        with gr.Tab("Generate", id="generate"):
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            png = gr.File(label="Restore settings from a noisecraft PNG", file_types=[".png"],
                                          elem_id="restore")
                        with gr.Tab("Edit", id="edit"):
                            editor = gr.ImageEditor(label="Image (paint white where inpainting regenerates)",
                                                    type="numpy", sources=["upload", "clipboard"],
                                                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed",
                                                                   default_size=12),
                                                    layers=False, elem_id="editor")
                            with gr.Row():
                                mode = gr.Radio(["img2img", "inpaint"], value="img2img", label="Mode",
                                                elem_id="mode")
                                strength = gr.Slider(0.05, 1, value=0.6, step=0.05, label="Strength (img2img)",
                                                     elem_id="strength")
                            edit_btn = gr.Button("Edit", variant="primary", elem_id="edit")
                        with gr.Tab("Interpolate", id="interpolate"):
                            gr.Markdown("A strip from the seed above to seed B: the starting noise moves along a "
                                        "slerp; with an end prompt (text models) or end label (class models) the "
                                        "condition moves too.")
                            with gr.Row():
                                seed_b = gr.Number(1, label="Seed B", precision=0, elem_id="seed_b")
                                frames = gr.Slider(2, 16, value=6, step=1, label="Pictures", elem_id="frames")
                            with gr.Row():
                                end_prompt = gr.Textbox(label="End prompt (text models; empty: the same)",
                                                        elem_id="end_prompt")
                                end_label = gr.Dropdown([NONE], value=NONE, label="End label (class models)",
                                                        allow_custom_value=True, elem_id="end_label")
                            interp_btn = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
                            strip = gr.Image(label="Seed / prompt interpolation", type="numpy",
                                             interactive=False, elem_id="strip")
                with gr.Column(scale=1):
                    status = gr.Markdown(_status("info", "pick a model to start."), elem_id="status")
                    preview = gr.Image(label="Live preview (x̂0)", type="numpy", interactive=False,
                                       height=256, elem_id="preview")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    gallery = gr.Gallery(label="Results (newest first; drop a noisecraft PNG here to restore its "
                                               "settings)",
                                         columns=4, height=360, object_fit="contain", allow_preview=False,
                                         interactive=False, elem_id="gallery")
                    send_btn = gr.Button("Send selected to Edit", elem_id="send")
            with gr.Tab("Watch and learn", id="learn"):
                _learn_tab(engine, library)
            with gr.Tab("Train", id="train"):
                _train_tab(library, threads)

        settings_inputs[:] = [model, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, eta,
                              seed, batch, height, width, preview_every, prompt_b, mix]
        outs = [preview, status, gallery, gallery_state, last_seed]
        # The progress bar and the queue position go over the gallery, so the live preview stays visible.
        gen = generate_btn.click(generate, settings_inputs + [gallery_state], outs, api_name="generate",
                                 concurrency_limit=1, concurrency_id="job", show_progress_on=[gallery])
        edit_btn.click(edit, settings_inputs + [gallery_state, editor, mode, strength], outs, api_name="edit",
                       concurrency_limit=1, concurrency_id="job", show_progress_on=[gallery])
        interp_btn.click(interpolate, settings_inputs + [seed_b, frames, end_prompt, end_label], [strip, status],
                         api_name="interpolate", concurrency_limit=1, concurrency_id="job")
        cancel_btn.click(cancel, None, status, api_name="cancel", concurrency_limit=None, queue=False)
        fitted = [status, prompt, negative_prompt, label, negative_label, sampler, steps, guidance, height, width, eta,
                  gallery_state, mixing, end_prompt, end_label]
        model.change(load_model, model, fitted, api_name="load_model", concurrency_limit=1, concurrency_id="job")
        demo.load(load_model, model, fitted, api_name=False, concurrency_limit=1, concurrency_id="job")
        demo.load(None, None, None, js=DROP_PNG_JS, api_name=False, queue=False)
        refresh_btn.click(refresh, None, [model, status], api_name="refresh", concurrency_limit=None)
        sampler.change(sampler_changed, sampler, eta, api_name=False, concurrency_limit=None, queue=False)
        reuse.click(reuse_seed, last_seed, seed, api_name=False, concurrency_limit=None, queue=False)
        gallery.select(select, gallery_state, selected, api_name=False, concurrency_limit=None)
        send_btn.click(send_to_edit, selected, [editor, modes, status], api_name=False, concurrency_limit=None)
        png.upload(restore, png, [status, model, prompt, negative_prompt, label, negative_label, sampler, steps,
                                  guidance, seed, height, width, prompt_b, mix], api_name="restore",
                   concurrency_limit=None)
        del gen, top
    return demo


# Dropping a PNG onto the preview or the gallery hands it to the "Restore settings" file box (whose upload event reads
# its parameters); anything else dropped there is left to the browser.
DROP_PNG_JS = """
() => {
  if (window.__noisecraftDrop) return;
  window.__noisecraftDrop = true;
  const area = (e) => e.target && e.target.closest && e.target.closest('#gallery, #preview');
  document.addEventListener('dragover', (e) => {
    if (area(e)) { e.preventDefault(); e.stopPropagation(); e.dataTransfer.dropEffect = 'copy'; }
  }, true);
  document.addEventListener('drop', (e) => {
    if (!area(e)) return;
    const files = [...(e.dataTransfer ? e.dataTransfer.files : [])].filter(
      (f) => f.type === 'image/png' || f.name.toLowerCase().endsWith('.png'));
    e.preventDefault(); e.stopPropagation();
    const input = document.querySelector('#restore input[type=file]');
    if (!files.length || !input) return;
    const dt = new DataTransfer();
    dt.items.add(files[0]);
    input.files = dt.files;
    input.dispatchEvent(new Event('change', {bubbles: true}));
  }, true);
}
"""


def interpolation_strip(images) -> np.ndarray:
    """N×C×H×W in [-1, 1] -> one H×(N·W)×3 uint8 picture with a 2-pixel gap, small pictures enlarged."""
    from .engine import enlarge, to_uint8
    pictures = [enlarge(p, 128) for p in to_uint8(images)]
    pictures = [np.repeat(p, 3, axis=-1) if p.shape[-1] == 1 else p for p in pictures]
    h = pictures[0].shape[0]
    gap = np.full((h, 2, 3), 255, np.uint8)
    return np.concatenate([x for p in pictures for x in (p, gap)][:-1], axis=1)


def editor_arrays(editor) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(image H×W×3 uint8, mask H×W: > 0 where painted) from gr.ImageEditor's value (numpy type)."""
    if not editor:
        return None, None
    background = editor.get("background")
    layers = [layer for layer in (editor.get("layers") or []) if layer is not None]
    composite = editor.get("composite")
    base = background if background is not None else composite
    if base is None:
        return None, None
    base = np.asarray(base)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=-1)
    image = base[..., :3].astype(np.uint8)
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.shape[:2] != mask.shape:
            continue
        painted = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else np.asarray(layer).max(-1) > 0 \
            if layer.ndim == 3 else layer > 0
        mask |= painted.astype(np.uint8)
    if not mask.any() and composite is not None and background is not None:
        # no layers (layers=False may flatten strokes into the composite): the painted pixels differ from the image
        comp = np.asarray(composite)[..., :3].astype(np.int16)
        if comp.shape == image.shape:
            mask = (np.abs(comp - image.astype(np.int16)).max(-1) > 8).astype(np.uint8)
    return image, mask


# --- Watch and learn / Train: from learn.py and training.py (built in parallel) -----------------------------------

def _learn_tab(engine: Engine, library: ModelLibrary) -> None:
    """The forward process of any picture (slider over t) and the schedules, from learn.py. Still to wire: the
    trajectory of a generation (learn.trajectory_strip / trajectory_gif) and the latent channels."""
    try:
        from .learn_tab import build_learn_tab
        build_learn_tab(engine, library)
    except ImportError:
        gr.Markdown("The *watch and learn* views (`noisecraft/ui/learn.py`) are not installed in this build.")


def _train_tab(library: ModelLibrary, threads: tuple[int, int] | None) -> None:
    """training.py's tab: a run in a subprocess with threads[1] torch threads (this server keeps threads[0], so the
    two never oversubscribe the cores), a live loss curve, the newest sample grid, stop / resume."""
    try:
        from .training import build_tab
    except ImportError:
        gr.Markdown("Training from the UI (`noisecraft/ui/training.py`) is not installed in this build.")
        return
    build_tab(library, threads=None if threads is None else threads[1])
