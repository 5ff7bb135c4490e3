"""What a model samples with when the caller does not say: the ONE place a model's sampling defaults live.

Every pipeline method (sample, img2img, inpaint, interpolate_seeds), every command-line flag and the UI take
None for "the model's default", and the pipeline fills it in from its `SamplingDefaults`, so the same request
gives the same picture whichever way it comes in.

Stable Diffusion checkpoints sample as the SD front ends do: LMS, 50 steps, guidance 7.5, linspace spacing, at
512×512. Our own runs sample with what our benchmarks found best for them. Pixel runs: DPM++ 2M SDE with 20 steps on
Karras σ's (20 network evaluations): after 20 CPU-minutes on MNIST it scored 1.52 / 1.61 (two training seeds)
against DDPM-10's 3.64 / 2.56 and DDIM-50's 3.35 / 2.59; after 10, 2.95 against 8.11 and 23.7; on CIFAR-10 after
10 and 40 CPU-minutes 13.4 and 10.1 against DDPM-10's 28.2 and 29.4: the best at 10, within 3% of DDIM-20 at 40 (README,
"EDM, distillation and colour on a CPU budget"). Latent runs keep DDPM-10: on MNIST latents after 20 CPU-minutes it
scored 0.36 against DPM++ 2M SDE-20's 0.45 and DDIM-50's 0.63. Text-conditional runs sample like pixel runs, at
guidance 2: on an MNIST latent text run (30 minutes) DPM++ 2M SDE-20 at w = 4 scored 1.86 against DDPM-30's 2.42 and
DDPM-10's 2.40; then a sweep of w with SDE-20 scored 0.14 (w = 1, no guidance), 0.30 (1.5), 0.68 (2), 1.01 (2.5),
1.31 (3), 1.86 (4), 2.66 (6), 3.48 (8). Stronger guidance costs diversity; w = 2 is the weakest at which every one of
the 1000 images showed its prompted class (w = 1: 95.6%, w = 1.5: 99.9%).
Interpolation moves only the starting noise, so it needs a deterministic sampler: `path_sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplingDefaults:
    sampler: str = "ddpm"          # any registered name or alias (see samplers/__init__.py)
    steps: int = 10                # sampler steps (network evaluations for first-order samplers)
    guidance: float = 1.0          # classifier-free guidance w; 1 = none (our w is the paper's w + 1)
    spacing: str = "leading"       # which σ's the default sampler visits: leading | trailing | linspace | karras | nested
    path_sampler: str = "ddim"     # interpolate_seeds: a deterministic sampler ...
    path_steps: int = 50           # ... and its steps
    # the σ's of a sampler the caller names without a spacing, and of the path sampler (None: `spacing`): a pixel
    # run's default is "DPM++ 2M SDE Karras", while `sampler="ddim"` alone stays DDIM on leading steps, as it always was
    other_spacing: str | None = None

    def resolve(self, sampler=None, steps=None, guidance=None, spacing=None, *, path: bool = False) -> dict:
        """The settings of one call: what the caller gave, the defaults for the rest."""
        default_sampler = sampler is None and not path
        if spacing is None:
            spacing = self.spacing if default_sampler else (self.other_spacing or self.spacing)
        return {"sampler": sampler if sampler is not None else (self.path_sampler if path else self.sampler),
                "steps": steps if steps is not None else (self.path_steps if path else self.steps),
                "guidance": float(guidance) if guidance is not None else self.guidance,
                "spacing": spacing}


OUR_LATENT_RUN = SamplingDefaults()
OUR_PIXEL_RUN = replace(OUR_LATENT_RUN, sampler="dpmpp_2m_sde", steps=20, spacing="karras",
                        other_spacing="leading")
OUR_TEXT_RUN = replace(OUR_PIXEL_RUN, guidance=2.0)   # prompts need some guidance to show; more costs diversity
STABLE_DIFFUSION = SamplingDefaults(sampler="lms", steps=50, guidance=7.5, spacing="linspace", path_sampler="lms",
                                    path_steps=50)
STABLE_DIFFUSION_SIZE = 512      # SD 1.x's default height and width


# EDM-preconditioned runs: EDM's own deterministic sampler, Heun (2nd order) on its ρ = 7 σ's (Karras et al. 2022,
# Algorithm 1), which needs no stochasticity to reach its best: 10 steps are 19 network evaluations.
OUR_EDM_RUN = SamplingDefaults(sampler="heun", steps=10, spacing="karras", path_sampler="heun", path_steps=10)
OUR_EDM_TEXT_RUN = replace(OUR_EDM_RUN, steps=15, guidance=4.0)   # w not swept on EDM text runs (VP's w = 2 was)


def distilled_defaults(steps: int, text_conditional: bool) -> SamplingDefaults:
    """A distilled student (training/distill.py) samples on the σ's it was trained on (its own steps, nested) with
    DPM++ 2M. Its first step and its last (to σ = 0) are the Euler steps the student was trained to take, so at 1 and
    2 steps it IS Euler; from 3 steps on its multistep correction helps: a 4-step student of the MNIST v-run scored
    3.07-3.22 with it against 3.57-3.85 with Euler (README, "EDM, distillation and colour on a CPU budget")."""
    return SamplingDefaults(sampler="dpmpp_2m", steps=steps, spacing="nested", guidance=4.0 if text_conditional else 1.0,
                            path_sampler="dpmpp_2m", path_steps=steps)


def consistency_defaults(steps: int, text_conditional: bool) -> SamplingDefaults:
    """A consistency student (training/consistency.py) samples with multistep consistency sampling (Song et al. 2023,
    Algorithm 1) on the nested σ's of its default steps; any other step count works with --steps. Interpolation
    takes its one deterministic step: every later step draws fresh noise."""
    return SamplingDefaults(sampler="consistency", steps=steps, spacing="nested",
                            guidance=4.0 if text_conditional else 1.0, path_sampler="consistency", path_steps=1)


def defaults_for_run(text_conditional: bool, edm: bool = False, distillation=None,
                     latent: bool = False) -> SamplingDefaults:
    """The defaults of a run trained by noisecraft (EDM-preconditioned or not, pixel or latent, or distilled: then
    `distillation` is its config's DistillationConfig)."""
    if distillation is not None and distillation.method == "consistency":
        return consistency_defaults(distillation.steps, text_conditional)
    if distillation is not None:
        return distilled_defaults(distillation.steps, text_conditional)
    if edm:
        return OUR_EDM_TEXT_RUN if text_conditional else OUR_EDM_RUN
    if text_conditional:
        return OUR_TEXT_RUN
    return OUR_LATENT_RUN if latent else OUR_PIXEL_RUN
