"""One generation at a time, on a worker thread, reporting as it goes (no Gradio in here).

`Engine.run(job)` is a generator of events: ("progress", step, total, seconds_left), ("preview", image) with the
decoded x̂0 of the first image after step 1, then every k-th step but at most one per PREVIEW_MIN_S seconds (so
previews cost a few per cent of a run at most; progress is throttled likewise), then one of ("done", [GalleryItem],
seed), ("cancelled", step, total) or ("error", sentence). The pipeline calls back after every sampler step
(`on_step`); Cancel sets a flag that the callback turns into an exception, so a run stops within one step. Full-size
PNGs (with their generation parameters) go to the output folder; the gallery shows small thumbnails, and nothing of
a finished generation stays in memory but their paths.
"""

from __future__ import annotations

import inspect
import itertools
import queue
import secrets
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import NoisecraftError
from .library import ModelLibrary

THUMB_SIDE = 160            # gallery thumbnails: at most this many pixels a side (tiny images are enlarged to it)
PREVIEW_SIDE = 256          # live previews: small images are enlarged (nearest) so they can be seen
PREVIEW_MIN_S = 0.25        # live previews: at most one per this many seconds of wall time (after the first)
PREVIEW_SHARE = 0.02        # ... and decoding them takes at most about this share of the run's time
PROGRESS_MIN_S = 0.1        # progress: at most one event per this many seconds (and the first and last step)


class Cancelled(Exception):
    """Raised from the sampler callback when the user pressed Cancel."""


def one_sentence(err: BaseException) -> str:
    """What the UI shows for an error: the library's own sentence, or the exception squeezed onto one line."""
    text = " ".join(str(err).split())
    if isinstance(err, NoisecraftError):
        return text
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{where + ': ' if where else ''}{err.strerror or text or type(err).__name__}."
    return f"{type(err).__name__}: {text[:300] or 'failed'} (this model or input cannot be used here)."


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×C×H×W in [-1, 1] -> N×H×W×C uint8 (C = 1 or 3)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def enlarge(image: np.ndarray, side: int) -> np.ndarray:
    """A small H×W×C picture enlarged by an integer factor (nearest) to about `side` pixels, for display."""
    h, w = image.shape[:2]
    k = max(1, side // max(h, w))
    return image.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else image


def _pil(image: np.ndarray):
    from PIL import Image
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


@dataclass(frozen=True)
class GalleryItem:
    image: Path        # the full PNG, with its parameters
    thumb: Path        # the small picture the gallery shows
    caption: str


@dataclass
class Job:
    """One request: what to make and how. None means the model's default (pipe.defaults)."""
    model: str
    kind: str = "txt2img"                  # txt2img | img2img | inpaint
    prompt: str | None = None
    negative_prompt: str | None = None
    label: int | None = None
    negative_label: int | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    eta: float | None = None
    seed: int = -1                         # -1: a random one
    n: int = 1
    height: int | None = None
    width: int | None = None
    preview_every: int = 2                 # 0: no previews
    image: np.ndarray | None = None        # edit jobs: H×W×3 uint8
    mask: np.ndarray | None = None         # inpaint: H×W, > 0 where to generate
    strength: float = 0.6                  # img2img
    prompt_b: str | None = None            # text models: a second prompt, mixed in by `mix` (pipe.mix_prompts)
    mix: float = 0.0


def takes_eta(sampler: str) -> bool:
    from ..samplers import get_sampler
    try:
        fn = get_sampler(sampler)
    except NoisecraftError:
        return False
    return "eta" in inspect.signature(fn).parameters


class Engine:
    """The loaded model (one at a time), the Cancel flag and the output folder."""

    def __init__(self, library: ModelLibrary, outputs: str | Path = "outputs/ui", device: str = "cpu"):
        self.library = library
        self.outputs = Path(outputs).expanduser().resolve()
        self.device = device
        self.pipe = None
        self.pipe_path: Path | None = None
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._cancel = threading.Event()
        self.owner: str | None = None          # who runs the current job (a session id): only they can cancel it
        self.running = False
        self._stopped = threading.Event()      # set when the sampler of the current job has returned
        self.cancelled_at: tuple[int, int] | None = None   # (step, total) of the latest cancelled job
        self._counter = itertools.count(self._next_number())

    # --- models ----------------------------------------------------------------------------------

    def load(self, model: str):
        """The pipeline for a model field's value (confined to the --models folders); keeps one model loaded."""
        path = self.library.resolve(model)
        with self._load_lock:
            if self.pipe is not None and self.pipe_path == path:
                return self.pipe
            from ..pipelines.stable_diffusion import load_pipeline
            self.pipe, self.pipe_path = None, None           # free the old one first
            pipe = load_pipeline(path, device=self.device)
            self.pipe, self.pipe_path = pipe, path
            return pipe

    def describe(self, pipe) -> dict:
        """What the form needs to know about a model."""
        c, h, w = pipe.image_shape
        d = pipe.defaults
        names = list(getattr(pipe.config.data, "class_names", None) or [])
        return {"text": pipe.takes_prompts, "classes": pipe.num_classes, "class_names": names, "channels": c,
                "height": h, "width": w, "multiple": pipe.downsample_factor, "sampler": d.sampler, "steps": d.steps,
                "guidance": d.guidance, "inpainting_model": pipe.inpainting_model}

    # --- cancel ------------------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """Whether the current (or last) job's sampler has returned."""
        return self._stopped.is_set()

    def cancel(self, owner: str | None = None, wait: float = 0.0) -> bool:
        """Stop the running job (only its owner's, when owners are given) within one sampler step; with `wait`,
        block up to that many seconds until the sampler has returned (then `cancelled_at` says where it stopped)."""
        if self.running and (owner is None or self.owner is None or owner == self.owner):
            self._cancel.set()
            self._stopped.wait(wait)
            return True
        return False

    # --- a job --------------------------------------------------------------------------------------

    def run(self, job: Job, owner: str | None = None):
        """Run one job, yielding events (see the module's docstring). Jobs never overlap: a second waits."""
        with self._run_lock:
            self._cancel.clear()
            self._stopped.clear()
            self.cancelled_at = None
            self.owner, self.running = owner, True
            try:
                yield from self._run(job)
            finally:
                self._cancel.set()            # a closed generator (client gone) stops the worker too
                self.running, self.owner = False, None

    def _run(self, job: Job):
        try:
            pipe = self.load(job.model)
            seed = int(job.seed) if job.seed is not None and int(job.seed) >= 0 else secrets.randbelow(2**31 - 1)
            call, total = self._prepare(pipe, job, seed)
        except Exception as e:      # noqa: BLE001 (any failure is a message in the UI, the server keeps serving)
            yield ("error", one_sentence(e))
            return
        events: queue.Queue = queue.Queue()
        started = time.monotonic()
        state = {"step": 0, "next_preview": 0.0, "next_progress": 0.0}

        def on_step(info):
            if self._cancel.is_set():
                raise Cancelled
            if info.get("start", 0):          # previews and progress follow the first batch
                return
            step = int(info["i"]) + 1
            state["step"] = step
            now = time.monotonic()
            # every event wakes the page's thread, which then competes with the sampler for the GIL: throttled
            if now >= state["next_progress"] or step == 1 or step >= total:
                state["next_progress"] = now + PROGRESS_MIN_S
                events.put(("progress", min(step, total), total, (now - started) / step * max(0, total - step)))
            if job.preview_every and (step % job.preview_every == 0 or step == 1) and info["sigma_next"] != 0 \
                    and time.monotonic() >= state["next_preview"]:
                t0 = time.monotonic()
                with torch.no_grad():
                    x0 = pipe.decode(info["denoised"][:1].to(pipe.device)).clamp(-1, 1)
                picture = enlarge(to_uint8(x0)[0], PREVIEW_SIDE)
                events.put(("preview", picture[..., 0] if picture.shape[-1] == 1 else picture))
                now = time.monotonic()
                # throttled by wall time, not only by steps: a decode (a VAE for latent models) every k fast steps
                # would cost more than the sampling itself; the first preview still comes after step 1
                state["next_preview"] = now + max(PREVIEW_MIN_S, (now - t0) / PREVIEW_SHARE)
            if self._cancel.is_set():
                raise Cancelled

        def work():
            try:
                result = call(on_step)
                events.put(("result", result))
            except Cancelled:
                self.cancelled_at = (state["step"], total)
                events.put(("cancelled", state["step"], total))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()           # the server's log keeps the details; the page gets one sentence
                events.put(("error", one_sentence(e)))
            finally:
                self._stopped.set()

        worker = threading.Thread(target=work, name="noisecraft-ui-job", daemon=True)
        worker.start()
        try:
            while True:
                # Whatever piled up while the page was being updated: only the newest progress and preview matter,
                # so a slow client never lags behind the sampler (and Cancel acts on what is shown).
                pending = [events.get()]
                while True:
                    try:
                        pending.append(events.get_nowait())
                    except queue.Empty:
                        break
                latest = {}
                for event in pending:
                    latest[event[0]] = event
                for kind in ("progress", "preview"):
                    if kind in latest:
                        yield latest[kind]
                if "result" in latest:
                    yield ("done", self._save(pipe, job, seed, latest["result"][1].images), seed)
                    return
                for kind in ("cancelled", "error"):
                    if kind in latest:
                        yield latest[kind]
                        return
        finally:
            self._cancel.set()
            worker.join()

    def _prepare(self, pipe, job: Job, seed: int):
        """(call(on_step) -> SampleResult, number of sampler steps) for a job, with every setting checked first."""
        settings = pipe.defaults.resolve(job.sampler or None, job.steps or None, job.guidance, None)
        steps = int(settings["steps"])
        options = {}
        if job.eta is not None and takes_eta(settings["sampler"]):
            options["eta"] = float(job.eta)
        n = int(job.n)
        if not 1 <= n <= 64:
            raise NoisecraftError(f"the batch size must be between 1 and 64, got {n}.")
        cond = {}
        mixing = bool(job.prompt_b) and float(job.mix or 0) != 0
        if mixing and not 0 <= float(job.mix) <= 1:
            raise NoisecraftError(f"the prompt mixing weight must be in [0, 1], got {job.mix}.")
        if pipe.takes_prompts:
            prompt = pipe.mix_prompts(job.prompt or "", job.prompt_b, float(job.mix)) if mixing else job.prompt or ""
            cond = {"prompt": prompt, "negative_prompt": job.negative_prompt or None}
        elif job.prompt or job.negative_prompt or job.prompt_b:
            raise NoisecraftError("this model is not text-conditional, so it takes no prompt; clear the prompt "
                                  "fields or pick a text-to-image model.")
        else:
            cond = {"label": job.label, "negative_label": job.negative_label}
        common = dict(sampler=settings["sampler"], steps=steps, guidance=settings["guidance"], seed=seed, **cond,
                      **options)
        if job.kind == "txt2img":
            size = {"height": int(job.height) if job.height else None, "width": int(job.width) if job.width else None}
            pipe.shape_for(size["height"], size["width"])          # a bad size fails before any work
            return (lambda on_step: pipe.sample(n, on_step=on_step, **size, **common)), steps
        if job.image is None:
            raise NoisecraftError("upload an image to edit first (or send one from the gallery).")
        images = self._input(pipe, job)
        if job.kind == "img2img":
            strength = float(job.strength)
            if not 0 < strength <= 1:
                raise NoisecraftError(f"the strength must be in (0, 1], got {strength}.")
            return (lambda on_step: pipe.img2img(images, strength, n=n, on_step=on_step, **common)), \
                max(1, round(strength * steps))
        if job.kind == "inpaint":
            if job.mask is None or not np.any(np.asarray(job.mask) > 0):
                raise NoisecraftError("paint the region to regenerate on the image first (white = generate).")
            mask = self._mask(job.mask, images.shape[-2:])
            return (lambda on_step: pipe.inpaint(images, mask, n=n, on_step=on_step, **common)), steps
        raise NoisecraftError(f"unknown job {job.kind!r}; use txt2img, img2img or inpaint.")

    def _target_size(self, pipe, job: Job, h: int, w: int) -> tuple[int, int]:
        if job.height and job.width:
            return pipe.round_size(int(job.height), int(job.width))
        _, h0, w0 = pipe.image_shape
        if pipe.vae is None:
            return h0, w0                          # pixel models: the size they were trained at
        scale = min(1.0, 768 / max(h, w))          # latent models: the picture's own size, at most 768 a side
        return pipe.round_size(max(1, int(h * scale)), max(1, int(w * scale)))

    def _input(self, pipe, job: Job) -> torch.Tensor:
        from PIL import Image
        image = np.asarray(job.image)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
            raise NoisecraftError("the image to edit must be an RGB, RGBA or grey picture.")
        pil = _pil(image[..., :3] if image.shape[-1] == 4 else image)
        c = pipe.image_shape[0]
        pil = pil.convert("L" if c == 1 else "RGB")
        h, w = self._target_size(pipe, job, pil.height, pil.width)
        pil = pil.resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32).reshape(h, w, -1)).permute(2, 0, 1)
        return x / 127.5 - 1

    @staticmethod
    def _mask(mask, size) -> torch.Tensor:
        from PIL import Image
        m = np.asarray(mask)
        if m.ndim == 3:
            m = m.max(axis=-1)
        pil = Image.fromarray(((m > 0) * 255).astype(np.uint8)).resize((int(size[1]), int(size[0])), Image.NEAREST)
        return torch.from_numpy((np.asarray(pil) > 127).astype(np.float32))

    # --- results -----------------------------------------------------------------------------------

    def _next_number(self) -> int:
        try:
            numbers = [int(p.name.split("-", 1)[0]) for p in self.outputs.glob("*.png") if p.name[:5].isdigit()]
        except OSError:
            numbers = []
        return max(numbers, default=-1) + 1

    def _save(self, pipe, job: Job, seed: int, images: torch.Tensor) -> list[GalleryItem]:
        from ..io.png_params import write_png
        thumbs = self.outputs / ".thumbs"
        thumbs.mkdir(parents=True, exist_ok=True)
        items = []
        _, h, w = (images.shape[1:] if images.ndim == 4 else images.shape)
        for index, image in enumerate(to_uint8(images)):
            number = next(self._counter)
            name = f"{number:05d}-{seed + index}.png"
            params = self._params(job, seed, index, h, w)
            # no fsync, fast compression: a picture lost to a power cut is redrawn from its settings
            path = write_png(self.outputs / name, image, params, durable=False, compress_level=1)
            thumb = _pil(enlarge(image, THUMB_SIDE))
            thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
            thumb_path = thumbs / name
            thumb.save(thumb_path, compress_level=1)
            what = job.prompt or (f"label {job.label}" if job.label is not None else job.kind)
            items.append(GalleryItem(Path(path), thumb_path, f"{what[:40]} · seed {seed + index}"))
        return items

    def _params(self, job: Job, seed: int, index: int, h: int, w: int) -> dict:
        pipe = self.pipe
        settings = pipe.defaults.resolve(job.sampler or None, job.steps or None, job.guidance, None)
        params = {"model": str(self.pipe_path), "job": job.kind, "sampler": settings["sampler"],
                  "steps": int(settings["steps"]), "guidance": float(settings["guidance"]),
                  "spacing": settings["spacing"], "seed": int(seed), "index": index, "height": int(h), "width": int(w),
                  "n": int(job.n), "batch_size": int(job.n)}   # one batch: --from-png redraws it bit for bit
        if job.eta is not None and takes_eta(settings["sampler"]):
            params["eta"] = float(job.eta)
        if pipe.takes_prompts:
            params["prompt"] = job.prompt or ""
            if job.negative_prompt:
                params["negative_prompt"] = job.negative_prompt
            if job.prompt_b and float(job.mix or 0) != 0:
                params["mix_prompt"], params["mix"] = job.prompt_b, float(job.mix)     # as `sample --mix-prompt`
        else:
            for key in ("label", "negative_label"):
                if getattr(job, key) is not None:
                    params[key] = int(getattr(job, key))
        if job.kind == "img2img":
            params["strength"] = float(job.strength)
        return params
