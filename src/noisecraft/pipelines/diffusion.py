"""Sampling from a trained run: load the EMA model, pick a sampler, apply guidance, keep intermediates.

One pipeline serves every kind of run: pixel or latent (the U-Net works on VAE latents that are decoded at the
end, Rombach et al. 2022), and unconditional, class-conditional or text-conditional (prompts are embedded by
the run's frozen text encoder and reach the U-Net through cross-attention)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig, load_run_config
from ..denoiser import ConsistencyFunction, Denoiser, vp_c_in
from ..errors import NoisecraftError
from ..guidance.classifier_free import ClassifierFreeGuidance
from ..guidance.loss import LatentSteering, LossGuidance
from ..io.checkpoint import load_weights
from ..memory import physical_memory
from ..models.unet import UNet
from ..samplers import control, generate
from ..samplers.control import lerp
from .defaults import SamplingDefaults, defaults_for_run


@dataclass
class SampleResult:
    images: torch.Tensor                      # N×C×H×W in [-1, 1]
    labels: torch.Tensor | None
    trajectory: list[dict] = field(default_factory=list)   # every k steps: {"i", "sigma", "x", "denoised"}


class DiffusionPipeline:
    """A trained model ready to sample:

        pipe = DiffusionPipeline.from_run("runs/mnist")
        images = pipe.sample(16, sampler="ddim", steps=50, seed=0).images
        pipe = DiffusionPipeline.from_run("runs/fashion-ldm")          # latent, text-conditional
        images = pipe.sample(16, prompt="a pair of trousers", guidance=4, steps=30).images
    """

    def __init__(self, model: UNet, config: RunConfig, device="cpu", vae=None, scaling_factor: float = 1.0,
                 text_encoder=None):
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        d = config.diffusion
        self.schedule = d.make_schedule()
        # x̂0 clipping to [-1, 1] is a pixel-range constraint; latents have no such range.
        self.denoiser = Denoiser(self.model, self.schedule, d.prediction, clip_x0=d.clip_x0 and vae is None,
                                 sigma_data=d.sigma_data, sigma_max_cap=d.sampling_sigma_max)
        if config.distillation is not None and config.distillation.method == "consistency":
            self.denoiser = ConsistencyFunction(self.denoiser)   # f(x, σ_min) = x: the student's boundary condition
        if (vae is None) != (config.latent is None):
            raise NoisecraftError("a latent run needs its VAE and a pixel run takes none; load it with from_run.")
        if (text_encoder is None) != (config.text is None):
            raise NoisecraftError("a text-conditional run needs its text encoder; load it with from_run.")
        self.vae = None if vae is None else vae.to(self.device).eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        self.text_encoder = text_encoder
        self._prompt_cache: dict[str, torch.Tensor] = {}
        # What every method uses for a setting left at None (pipelines/defaults.py); Stable Diffusion pipelines
        # (pipelines/stable_diffusion.py) replace them with SD's own.
        self.defaults: SamplingDefaults = defaults_for_run(
            text_conditional=config.text is not None, edm=d.edm, latent=config.latent is not None,
            distillation=config.distillation)

    # --- the latent space and the text encoder ---------------------------------------------------

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """The shape the sampler works in: the image's, or the VAE latent's."""
        return self.config.model_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config.data.image_shape)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along a side (1 for pixel models; 8 for Stable Diffusion)."""
        return 1 if self.vae is None else self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.model_shape[0]

    def _check_memory(self, height: int, width: int) -> None:
        """One image's full-resolution U-Net activations (~16 live tensors of base_channels floats per position)
        must fit in memory: refuse 100000×100000 before allocating anything."""
        f = self.downsample_factor
        need = (height // f) * (width // f) * self.model.config.base_channels * 4 * 16
        have = physical_memory()
        if have is not None and need > have:
            raise NoisecraftError(f"{height}×{width} images need about {need / 2**30:,.0f} GiB each in the U-Net, more "
                                  f"than this machine's {have / 2**30:,.0f} GiB; choose a smaller --height/--width.")

    def round_size(self, height: int, width: int) -> tuple[int, int]:
        """The nearest size this model works at: each side rounded down to a multiple of the VAE's factor (at least
        one factor), as diffusers' img2img does. img2img and inpaint keep their input's size this way."""
        f = self.downsample_factor
        return max(f, height // f * f), max(f, width // f * f)

    def shape_for(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """The sampler's shape for images of height × width (default: the size the model was trained at).
        Any multiple of the VAE's downsampling factor works: the U-Net is fully convolutional."""
        if height is None and width is None:
            return self.model_shape
        _, h0, w0 = self.image_shape
        height, width = h0 if height is None else height, w0 if width is None else width
        f = self.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < f or value % f:
                raise NoisecraftError(f"{name} must be a positive multiple of {f} for this model, got {value!r}.")
        self._check_memory(height, width)
        return (self.latent_channels, height // f, width // f)

    # --- memory and speed -----------------------------------------------------------------------

    def set_precision(self, dtype: torch.dtype | str) -> "DiffusionPipeline":
        """Run the U-Net and the text encoder in float32, bfloat16 or float16 (half the memory of float32 weights).
        The VAE decoder stays in float32: a half-precision decoder is the classic source of black or NaN images."""
        dtype = parse_dtype(dtype)
        self.model.to(dtype)
        if self.text_encoder is not None:
            self.text_encoder.to(dtype)
        self._prompt_cache.clear()
        return self

    def enable_attention_slicing(self, slice_size: int | None = 1024) -> "DiffusionPipeline":
        """Compute attention for slice_size query positions at a time (None: all at once): lower peak memory
        for large images at a small cost in speed."""
        from ..models.attention import set_attention_slicing
        set_attention_slicing(self.model, slice_size)
        return self

    def enable_vae_tiling(self, tile_latent: int = 64, overlap: float = 0.25) -> "DiffusionPipeline":
        """Decode (and encode) through overlapping tiles blended linearly: large images in bounded memory."""
        from ..models.vae_tiling import TiledVAE
        if self.vae is None:
            raise NoisecraftError("VAE tiling needs a latent model; this pixel model has no VAE.")
        base = self.vae.vae if isinstance(self.vae, TiledVAE) else self.vae
        self.vae = TiledVAE(base, tile_latent=tile_latent, overlap=overlap)
        return self

    @property
    def takes_prompts(self) -> bool:
        return self.text_encoder is not None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the U-Net denoises: the images, or s·(VAE posterior mean)."""
        if self.vae is None:
            return images
        return torch.cat([self.vae.encode(part).mode() * self.scaling_factor for part in images.split(250)])

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The U-Net's space -> images: identity, or the VAE decoder of z / s (in float32, in chunks)."""
        if self.vae is None:
            return x
        return torch.cat([self.vae.decode(part.float() / self.scaling_factor) for part in x.split(250)])

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Token embeddings N×L×D of prompts through the frozen text encoder (cached per distinct prompt)."""
        if self.text_encoder is None:
            raise NoisecraftError("this model is not text-conditional, so it takes no prompt; train it with "
                                  "--text-encoder, or use --label for class-conditional models.")
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        if missing:
            with torch.no_grad():
                tokens = self.text_encoder(missing)[0].float().to(self.device)
            self._prompt_cache.update(zip(missing, tokens))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _prompt_embeddings(self, n: int, prompt) -> torch.Tensor:
        """N×L×D embeddings for a prompt, a list of prompts, or embeddings given directly (L×D or N×L×D, e.g.
        from `mix_prompts`)."""
        if not torch.is_tensor(prompt):
            return self.embed(self._prompts(n, prompt))
        emb = prompt.to(self.device, torch.float32)
        if emb.ndim == 2:
            emb = emb.unsqueeze(0)
        expected = self.embed([""]).shape[1:]
        if emb.ndim != 3 or tuple(emb.shape[1:]) != tuple(expected) or emb.shape[0] not in (1, n):
            raise NoisecraftError(f"prompt embeddings must have shape {n}×{expected[0]}×{expected[1]} or "
                                  f"{expected[0]}×{expected[1]}, got {tuple(prompt.shape)}; make them with embed().")
        return emb.expand(n, *expected)

    def mix_prompts(self, prompt_a: str, prompt_b: str, weight: float = 0.5, tokens=None) -> torch.Tensor:
        """Prompt-embedding mixing: (1 - weight)·E(a) + weight·E(b) over all token positions, or only at the
        positions in `tokens` (e.g. range(1, 4): the first three words take on b's meaning) — pass the result as
        `prompt=` to sample. Cross-attention reads each token embedding separately, so mixing a few positions
        blends concepts while the rest of prompt a stays as it is."""
        a, b = self.embed([prompt_a, prompt_b])
        if tokens is None:
            return torch.lerp(a, b, float(weight))
        positions = torch.as_tensor(list(tokens), dtype=torch.long)
        if positions.numel() and (positions.min() < 0 or positions.max() >= a.shape[0]):
            raise NoisecraftError(f"token positions must lie in 0..{a.shape[0] - 1}, got {list(tokens)}.")
        mixed = a.clone()
        mixed[positions] = torch.lerp(a[positions], b[positions], float(weight))
        return mixed

    def _prompts(self, n: int, prompt) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) == 1:
            prompts = prompts * n
        if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise NoisecraftError(f"give one prompt or {n} of them (one per image), got {len(prompts)}.")
        return prompts

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu", weights: str = "ema") -> "DiffusionPipeline":
        """Load a run directory: config.json + model.safetensors (EMA) or state/model.safetensors (raw), and
        for latent / text runs the VAE in vae/ and the text encoder in text_encoder/."""
        from ..components import load_text_component, load_vae_component
        run_dir = Path(run_dir)
        config = load_run_config(run_dir)
        vae, scaling_factor = load_vae_component(run_dir) if config.latent is not None else (None, 1.0)
        text_encoder = load_text_component(run_dir) if config.text is not None else None
        path = run_dir / "model.safetensors" if weights == "ema" else run_dir / "state" / "model.safetensors"
        model = UNet(config.model)
        try:
            model.load_state_dict(load_weights(path))
        except RuntimeError as e:
            raise NoisecraftError(f"{path} does not match the model described in config.json "
                                  f"({str(e).splitlines()[0][:160]}); the run directory is inconsistent.") from None
        return cls(model, config, device, vae=vae, scaling_factor=scaling_factor, text_encoder=text_encoder)

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def _labels(self, n: int, label) -> torch.Tensor | None:
        if label is None:
            return None
        if not self.num_classes:
            raise NoisecraftError("this model is unconditional, so it takes no --label; train with --conditional.")
        labels = torch.as_tensor(label).long().flatten()
        if labels.numel() == 1:
            labels = labels.expand(n)
        if labels.numel() != n or labels.min() < 0 or labels.max() >= self.num_classes:
            raise NoisecraftError(f"labels must be {n} integers in 0..{self.num_classes - 1}, got {label!r}.")
        return labels.to(self.device)

    def _check_label(self, label: int, what: str) -> int:
        if not self.num_classes:
            raise NoisecraftError(f"this model is unconditional, so it takes no {what}; train with --conditional.")
        if not isinstance(label, int) or not 0 <= label < self.num_classes:
            raise NoisecraftError(f"{what} must be an integer in 0..{self.num_classes - 1}, got {label!r}.")
        return label

    def _conditioning(self, n: int, label, negative_label, prompt=None, negative_prompt=None) -> torch.Tensor | None:
        """Labels (or, for text models, prompt embeddings) for n images. A negative label with no label steers
        away from it: the condition is then the null label, and the negative one takes the unconditional side
        of guidance. Text models work alike with the empty prompt as the null label."""
        if self.takes_prompts:
            if label is not None or negative_label is not None:
                raise NoisecraftError("this model is text-conditional: describe the image with a prompt instead of "
                                      "a class label.")
            return self._prompt_embeddings(n, "" if prompt is None else prompt)
        if prompt is not None or negative_prompt is not None:
            self.embed([])   # raises the "not text-conditional" error
        if negative_label is not None:
            self._check_label(negative_label, "negative label")
            if label is None:
                return torch.full((n,), self.num_classes, device=self.device)
        return self._labels(n, label)

    def _one_hot(self, label: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(label), self.num_classes + 1).float().to(self.device)

    def _make_denoiser(self, soft: bool = False, guidance: float = 1.0, negative_label: int | None = None,
                       guide=None, guide_scale: float = 1.0, guide_every: int = 1, guide_mode: str = "x0",
                       guide_max_sigma: float = float("inf"), negative_prompt: str | None = None, base=None):
        """The base denoiser with classifier-free guidance (the negative label or prompt, if any, in place of the
        null label or empty prompt) and loss guidance stacked on. A new one for each batch, so guide_every
        counts from its start. In a latent run the guide's loss sees the decoded image of x̂0."""
        denoiser = self.denoiser if base is None else base
        if self.takes_prompts and (guidance != 1.0 or negative_prompt is not None):
            uncond = self._prompt_embeddings(1, "" if negative_prompt is None else negative_prompt)[0]
            denoiser = ClassifierFreeGuidance(denoiser, guidance, uncond)
        elif self.num_classes and (guidance != 1.0 or negative_label is not None):
            other = self.num_classes if negative_label is None else negative_label
            uncond = self._one_hot(other) if soft else torch.tensor(other, device=self.device)
            denoiser = ClassifierFreeGuidance(denoiser, guidance, uncond)
        if guide is not None:
            if self.vae is not None:
                pixel_guide = guide
                guide = lambda z0: pixel_guide(self.decode(z0))   # noqa: E731 (gradients flow through the decoder)
            denoiser = LossGuidance(denoiser, guide, guide_scale, guide_every, guide_mode, guide_max_sigma)
        return denoiser

    def _run(self, n: int, draw, *, label=None, negative_label=None, prompt=None, negative_prompt=None,
             save_every: int = 0, batch_size: int = 250, progress=None, base=None, on_step=None,
             **guides) -> SampleResult:
        """Draw n images in batches: draw(denoiser, start, count, cond, callback) -> images of one batch.
        Keeps x_t and x̂0 every save_every steps of the first batch; progress(k) counts finished images."""
        if n < 1:
            raise NoisecraftError(f"the number of samples must be at least 1, got {n}.")
        if batch_size < 1:
            raise NoisecraftError(f"the batch size must be at least 1, got {batch_size}.")
        labels = self._conditioning(n, label, negative_label, prompt, negative_prompt)
        if negative_prompt is not None:
            guides["negative_prompt"] = negative_prompt
        images, trajectory = [], []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)

            def keep(info, first=start == 0, count=count, start=start):
                last = info["sigma_next"] == 0
                if first and save_every and (info["i"] % save_every == 0 or last):
                    trajectory.append({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in info.items()})
                if progress is not None:
                    progress(count if last else 0)
                if on_step is not None:
                    on_step({**info, "start": start})

            denoiser = self._make_denoiser(False, negative_label=negative_label, base=base, **guides)
            cond = None if labels is None else labels[start:start + count]
            images.append(self.decode(draw(denoiser, start, count, cond, keep)).clamp(-1, 1).cpu())
        shown = None if labels is None or label is None else labels.cpu()
        return SampleResult(torch.cat(images), shown, self._decode_trajectory(trajectory))

    def _decode_trajectory(self, trajectory: list[dict]) -> list[dict]:
        """Add what the saved steps look like as images: "preview", x_t on the data scale (the VP input
        x/sqrt(1 + σ²), which a human reads as a noisy image). In a latent run the preview and "denoised" (x̂0)
        are decoded, and the latents stay under "x_latent" and "denoised_latent"."""
        with torch.no_grad():
            for info in trajectory:
                preview = info["x"] * float(vp_c_in(torch.tensor(float(info["sigma"]))))
                if self.vae is None:
                    info["preview"] = preview
                    continue
                info["x_latent"], info["denoised_latent"] = info["x"], info["denoised"]
                info["preview"] = self.decode(preview.to(self.device)).cpu()
                info["denoised"] = self.decode(info["denoised"].to(self.device)).cpu()
        return trajectory

    def _input_images(self, images, n: int | None, what: str = "input images") -> torch.Tensor:
        """Images in [-1, 1] as N×C×H×W on the device, checked against the model; one image repeats n times.
        (Latent runs encode them with `encode` afterwards.)"""
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim == 3:
            images = images.unsqueeze(0)
        c = self.image_shape[0]
        if images.ndim != 4 or images.shape[1] != c:
            raise NoisecraftError(f"{what} must have shape N×{c}×H×W for this model, got {tuple(images.shape)}; "
                                  "convert them first.")
        height, width = self.round_size(images.shape[2], images.shape[3])
        self._check_memory(height, width)
        if (height, width) != tuple(images.shape[2:]):
            warnings.warn(f"{what} of {images.shape[2]}×{images.shape[3]} resized to {height}×{width} (a multiple of "
                          f"{self.downsample_factor} for this model).", stacklevel=3)
            images = torch.nn.functional.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                                                     align_corners=False).clamp(-1, 1)
        shape = tuple(images.shape[1:])
        if n is not None:
            if images.shape[0] == 1:
                images = images.expand(n, *shape)
            elif images.shape[0] != n:
                raise NoisecraftError(f"got {images.shape[0]} {what} for n={n}; give one image or n of them.")
        return images.to(self.device)

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | None = None, steps: int | None = None, seed: int = 0, label=None,
               prompt=None, negative_prompt: str | None = None,
               guidance: float | None = None, negative_label: int | None = None, guide=None, guide_scale: float = 1.0,
               guide_every: int = 1, guide_mode: str = "x0", guide_max_sigma: float = float("inf"),
               save_every: int = 0, batch_size: int = 250, spacing: str | None = None, progress=None,
               height: int | None = None, width: int | None = None, noise: torch.Tensor | None = None,
               on_step=None, **options) -> SampleResult:
        """Draw n images. sampler, steps, guidance and spacing left at None take the model's defaults
        (`self.defaults`: pipelines/defaults.py).

        label: None (unconditional), one class index, or one per image. guidance w > 1: classifier-free
        guidance, with `negative_label` (if given) in place of the null label, so samples move away from
        that class (with no label: "anything but this class"). guide: loss guidance with a callable
        loss(x0) -> one loss per sample to push down, by guide_scale, on every guide_every-th denoiser
        call, guide_mode "x0" (shift x̂0 by the gradient) or "score" (gradient through the network), only
        at σ <= guide_max_sigma (see noisecraft.guidance.loss.LossGuidance). save_every k > 0 keeps x_t and x̂0
        every k steps (first batch only). Sample i uses seed + i, whatever batch_size.
        Text-conditional models take `prompt` (one, or one per image, or embeddings from `embed` / `mix_prompts`)
        and `negative_prompt` instead of labels. height/width: the image size (multiples of the VAE factor; default
        the training size). noise: the starting latents N×C×h×w ~ N(0, I) instead of seeded ones.
        on_step(info): called after every sampler step with the sampler's info ("i", "sigma", "sigma_next", "x",
        "denoised"; latents in a latent run) and "start" (the batch's first image), e.g. for a live preview; an
        exception raised there stops sampling at once (the UI's Cancel)."""
        if self.inpainting_model:
            raise NoisecraftError("this is an inpainting model (its U-Net also reads a mask and the masked image); "
                                  "use inpaint with an image and a mask.")
        settings = self.defaults.resolve(sampler, steps, guidance, spacing)
        sampler, steps, guidance, spacing = (settings[k] for k in ("sampler", "steps", "guidance", "spacing"))
        guide, options = self._steering({"guide": guide, "guide_scale": guide_scale, "guide_every": guide_every,
                                         "guide_mode": guide_mode}, options)
        shape = self.shape_for(height, width)
        if noise is not None and (noise.ndim != 4 or tuple(noise.shape) != (n, *shape)):
            raise NoisecraftError(f"noise must have shape {n}×{'×'.join(map(str, shape))}, got {tuple(noise.shape)}.")

        def draw(denoiser, start, count, cond, keep):
            part = None if noise is None else noise[start:start + count]
            return generate(denoiser, (count, *shape), sampler=sampler, steps=steps, spacing=spacing, cond=cond,
                            seed=seed + start, callback=keep, device=self.device, noise=part, **options)

        return self._run(n, draw, label=label, negative_label=negative_label, prompt=prompt,
                         negative_prompt=negative_prompt, save_every=save_every,
                         batch_size=batch_size, progress=progress, guidance=guidance, guide=guide,
                         guide_scale=guide_scale, guide_every=guide_every, guide_mode=guide_mode,
                         guide_max_sigma=guide_max_sigma, on_step=on_step)

    @torch.no_grad()
    def img2img(self, images, strength: float = 0.6, *, n: int | None = None, sampler: str | None = None,
                steps: int | None = None, seed: int = 0, spacing: str | None = None, **kwargs) -> SampleResult:
        """SDEdit: noise `images` (N×C×H×W or C×H×W in [-1, 1]) to strength s ∈ (0, 1] and denoise them
        with the last round(s·steps) steps of the sampler (see noisecraft.samplers.control.img2img).
        With one input image and n given, it is edited n times (seeds seed, seed + 1, ...). Labels,
        guidance, loss guidance, save_every, batch_size, progress and sampler options as in `sample`; the
        output has the input's size (rounded to a multiple of `size_multiple`, see `round_size`)."""
        sampler, steps, spacing, kwargs = self._resolve(sampler, steps, spacing, kwargs)
        images = self._input_images(images, n)
        control.strength_sigmas(torch.zeros(2), strength)                  # a bad strength fails before any work
        images = self.encode(images)
        run_kw, options = self._split(kwargs)

        def draw(denoiser, start, count, cond, keep):
            return control.img2img(denoiser, images[start:start + count], strength, sampler=sampler, steps=steps,
                                   spacing=spacing, cond=cond, seed=seed + start, callback=keep, **options)

        return self._run(images.shape[0], draw, **run_kw)

    @torch.no_grad()
    def inpaint(self, images, mask, *, n: int | None = None, sampler: str | None = None, steps: int | None = None,
                seed: int = 0, spacing: str | None = None, **kwargs) -> SampleResult:
        """Generate the region where `mask` is 1 (white) and keep `images` where it is 0 (see
        noisecraft.guidance.loss.InpaintingDenoiser). mask: H×W, 1×H×W, N×1×H×W or N×C×H×W in [0, 1]. Other
        arguments as in `img2img`."""
        sampler, steps, spacing, kwargs = self._resolve(sampler, steps, spacing, kwargs)
        images = self._input_images(images, n)
        mask = torch.as_tensor(mask, dtype=torch.float32, device=self.device)
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
        try:
            mask = mask.expand_as(images)
        except RuntimeError:
            raise NoisecraftError(f"the mask of shape {tuple(mask.shape)[-2:]} does not fit images of shape "
                                  f"{tuple(images.shape)}; give an H×W mask of the model's image size.") from None
        if self.inpainting_model:
            return self._inpaint_conditioned(images, mask, sampler=sampler, steps=steps, seed=seed, spacing=spacing,
                                             **kwargs)
        if self.vae is not None:
            # Latent inpainting: the known region is kept in latent space, with the mask shrunk to the latent
            # grid (area average, then "generate" wherever any of the patch is to be generated).
            images = self.encode(images)
            small = torch.nn.functional.adaptive_avg_pool2d(mask[:, :1], images.shape[-2:])
            mask = (small > 0).float().expand_as(images)
        run_kw, options = self._split(kwargs)

        def draw(denoiser, start, count, cond, keep):
            part = slice(start, start + count)
            return control.inpaint(denoiser, images[part], mask[part], sampler=sampler, steps=steps, spacing=spacing,
                                   cond=cond, seed=seed + start, callback=keep, **options)

        return self._run(images.shape[0], draw, **run_kw)

    @property
    def inpainting_model(self) -> bool:
        """A U-Net trained for inpainting (SD's 9-channel model): its input is [z_t, mask, E(masked image)]."""
        return self.vae is not None and self.model.config.in_channels == 2 * self.latent_channels + 1

    def _inpaint_conditioned(self, images, mask, *, strength: float = 1.0, sampler, steps, seed, spacing, **kwargs):
        """Inpainting with a U-Net that reads the mask and the masked image's latents as extra input channels
        (Stable Diffusion's inpainting model): no blending, the network itself keeps the unmasked region.
        strength 1 starts from pure noise; below 1 from the noised image's latents, as in img2img."""
        from ..denoiser import Denoiser
        pixel_mask = (mask[:, :1] >= 0.5).float()
        masked_latents = self.encode(images * (1 - pixel_mask))     # the region to fill is blanked (0 = grey)
        small_mask = torch.nn.functional.interpolate(pixel_mask, size=masked_latents.shape[-2:])   # nearest
        net = ConditionedUNet(self.model, torch.cat([small_mask, masked_latents], dim=1))
        base = Denoiser(net, self.schedule, self.config.diffusion.prediction, clip_x0=False,
                        sigma_data=self.config.diffusion.sigma_data,
                        sigma_max_cap=self.config.diffusion.sampling_sigma_max)
        run_kw, options = self._split(kwargs)
        shape = tuple(masked_latents.shape[1:])
        start_latents = self.encode(images) if strength < 1 else None

        def draw(denoiser, start, count, cond, keep):
            net.select(slice(start, start + count))
            if start_latents is None:
                return generate(denoiser, (count, *shape), sampler=sampler, steps=steps, spacing=spacing, cond=cond,
                                seed=seed + start, callback=keep, device=self.device, **options)
            return control.img2img(denoiser, start_latents[start:start + count], strength, sampler=sampler,
                                   steps=steps, spacing=spacing, cond=cond, seed=seed + start, callback=keep,
                                   **options)

        return self._run(images.shape[0], draw, base=base, **run_kw)

    def _resolve(self, sampler, steps, spacing, kwargs: dict):
        """img2img / inpaint: the model's defaults for what was left at None (guidance travels in kwargs)."""
        settings = self.defaults.resolve(sampler, steps, kwargs.get("guidance"), spacing)
        kwargs = {**kwargs, "guidance": settings["guidance"]}
        kwargs["guide"], kwargs = self._steering(kwargs, kwargs)
        return settings["sampler"], settings["steps"], settings["spacing"], kwargs

    def _steering(self, guides: dict, options: dict):
        """guide_mode "latents" (the tutorials' recipe, guidance/loss.py: LatentSteering) moves the sampler's x
        between steps instead of wrapping the denoiser: it becomes the sampler option `steer`, with the loss seeing
        the decoded image in a latent run. Returns (the guide left for the denoiser, the options)."""
        guide = guides.get("guide")
        if guide is None or guides.get("guide_mode") != "latents":
            return guide, options
        loss = guide if self.vae is None else (lambda z0: guide(self.decode(z0)))
        steering = LatentSteering(loss, guides.get("guide_scale", 1.0), guides.get("guide_every", 1))
        return None, {**options, "steer": steering}

    _RUN_KEYS = ("label", "negative_label", "prompt", "negative_prompt", "save_every", "batch_size", "progress",
                 "guidance", "guide", "guide_scale", "guide_every", "guide_mode", "guide_max_sigma", "on_step")

    def _split(self, kwargs: dict) -> tuple[dict, dict]:
        """(arguments for _run, sampler options) out of the keyword arguments of img2img / inpaint."""
        return ({k: v for k, v in kwargs.items() if k in self._RUN_KEYS},
                {k: v for k, v in kwargs.items() if k not in self._RUN_KEYS})

    @torch.no_grad()
    def interpolate_seeds(self, seed_a: int, seed_b: int, n: int = 8, *, label: int | None = None,
                          label_b: int | None = None, prompt: str | None = None, prompt_b: str | None = None,
                          negative_prompt: str | None = None, sampler: str | None = None, steps: int | None = None,
                          guidance: float | None = None, negative_label: int | None = None, save_every: int = 0,
                          spacing: str | None = None, height: int | None = None, width: int | None = None,
                          **options) -> SampleResult:
        """n images on the path from seed_a's picture to seed_b's: slerp of the starting noise (the ends are
        exactly `sample(1, seed=seed_a)` and `seed_b`'s for deterministic samplers). With label and label_b
        the class moves too: the label embeddings are mixed linearly (soft labels), e.g. from a 3 to an 8.
        Text models do the same with prompt and prompt_b: their token embeddings are mixed linearly.
        Left at None, sampler and steps are the model's deterministic path sampler (`defaults.path_sampler`)."""
        settings = self.defaults.resolve(sampler, steps, guidance, spacing, path=True)
        sampler, steps, guidance, spacing = (settings[k] for k in ("sampler", "steps", "guidance", "spacing"))
        shape = self.shape_for(height, width)
        if prompt_b is not None:
            if prompt is None:
                raise NoisecraftError("prompt_b is the end of a path between two prompts; give its start with prompt.")
            a, b = self.embed([prompt, prompt_b])
            cond = lerp(a, b, torch.linspace(0, 1, n, device=self.device))
            denoiser = self._make_denoiser(False, guidance, negative_prompt=negative_prompt)
        elif label_b is None:
            cond = self._conditioning(n, label, negative_label, prompt, negative_prompt)
            denoiser = self._make_denoiser(False, guidance, negative_label, negative_prompt=negative_prompt)
        else:
            if label is None:
                raise NoisecraftError("label_b is the end of a path between two classes; give its start with label.")
            a = self._one_hot(self._check_label(label, "label"))
            b = self._one_hot(self._check_label(label_b, "label_b"))
            cond = lerp(a, b, torch.linspace(0, 1, n, device=self.device))
            denoiser = self._make_denoiser(True, guidance, negative_label)
        trajectory = []

        def keep(info):
            if save_every and (info["i"] % save_every == 0 or info["sigma_next"] == 0):
                trajectory.append({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in info.items()})

        x = control.interpolate(denoiser, shape, seed_a, seed_b, n, sampler=sampler, steps=steps, spacing=spacing,
                                cond=cond, callback=keep, device=self.device, **options)
        return SampleResult(self.decode(x).clamp(-1, 1).cpu(), None, self._decode_trajectory(trajectory))


class ConditionedUNet(torch.nn.Module):
    """A U-Net whose input has extra channels fixed per image (SD inpainting: mask and masked-image latents):
    forward(x, t, cond) = unet(cat[x, extra], t, cond). The sampler's batch may be the selected images repeated
    (classifier-free guidance runs conditional and unconditional halves in one batch), so `extra` is tiled to it."""

    def __init__(self, unet: torch.nn.Module, extra: torch.Tensor):
        super().__init__()
        self.unet, self.extra, self.part = unet, extra, extra

    @property
    def config(self):
        return self.unet.config

    def select(self, rows: slice) -> None:
        self.part = self.extra[rows]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        extra = self.part.to(x.dtype).repeat(x.shape[0] // self.part.shape[0], 1, 1, 1)
        return self.unet(torch.cat([x, extra], dim=1), t, cond)


def parse_dtype(dtype) -> torch.dtype:
    """torch.float32 / "float32" / "fp32", bfloat16 / "bf16", float16 / "fp16" / "half"."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise NoisecraftError(f"unknown precision {dtype!r}; use float32, bfloat16 or float16.")
