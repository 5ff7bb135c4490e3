"""The largest network noisecraft builds from a config: far above any real one (Stable Diffusion XL's U-Net has
2.6e9 parameters), so that a corrupted or hostile config (base_channels = 10^9) fails with a clear sentence from
its estimated size, before a single weight is allocated, instead of exhausting the memory."""

from __future__ import annotations

from ..errors import NoisecraftError

MAX_PARAMETERS = 2 ** 33


def check_parameter_count(n: int, what: str, fix: str) -> None:
    """Refuse settings that give `what` (e.g. "a U-Net") about n parameters, over MAX_PARAMETERS."""
    if n > MAX_PARAMETERS:
        raise NoisecraftError(f"these settings give {what} of about {n:.3g} parameters, more than the "
                              f"{MAX_PARAMETERS:.3g} noisecraft builds; {fix}.")
