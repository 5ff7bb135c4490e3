"""What a model samples with when the caller does not say: the ONE place a model's sampling defaults live.

Every pipeline method (sample, img2img, inpaint, interpolate_seeds), every command-line flag and the UI take
None for "the model's default", and the pipeline fills it in from its `SamplingDefaults`, so the same request
gives the same picture whichever way it comes in.

Stable Diffusion checkpoints sample as the SD front ends do: LMS, 50 steps, guidance 7.5, linspace spacing, at
512×512. Our own runs sample with what our benchmarks found best for them: DDPM ancestral with 10 steps for
pixel models (on the 20-minute MNIST run it beat DDIM-50 at a fifth of the cost; README, "sample quality vs
network evaluations"), 30 steps at guidance 4 for text-conditional runs, whose prompts need guidance to show.
Interpolation moves only the starting noise, so it needs a deterministic sampler: `path_sampler`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplingDefaults:
    sampler: str = "ddpm"          # any registered name or alias (see samplers/__init__.py)
    steps: int = 10                # sampler steps (network evaluations for first-order samplers)
    guidance: float = 1.0          # classifier-free guidance w; 1 = none (our w is the paper's w + 1)
    spacing: str = "leading"       # which training timesteps the steps visit: leading | trailing | linspace
    path_sampler: str = "ddim"     # interpolate_seeds: a deterministic sampler ...
    path_steps: int = 50           # ... and its steps

    def resolve(self, sampler=None, steps=None, guidance=None, spacing=None, *, path: bool = False) -> dict:
        """The settings of one call: what the caller gave, the defaults for the rest."""
        return {"sampler": sampler if sampler is not None else (self.path_sampler if path else self.sampler),
                "steps": steps if steps is not None else (self.path_steps if path else self.steps),
                "guidance": float(guidance) if guidance is not None else self.guidance,
                "spacing": spacing if spacing is not None else self.spacing}


OUR_RUN = SamplingDefaults()
OUR_TEXT_RUN = replace(OUR_RUN, steps=30, guidance=4.0)
STABLE_DIFFUSION = SamplingDefaults(sampler="lms", steps=50, guidance=7.5, spacing="linspace", path_sampler="lms",
                                    path_steps=50)
STABLE_DIFFUSION_SIZE = 512      # SD 1.x's default height and width


def defaults_for_run(text_conditional: bool) -> SamplingDefaults:
    """The defaults of a run trained by noisecraft."""
    return OUR_TEXT_RUN if text_conditional else OUR_RUN
