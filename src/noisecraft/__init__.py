"""noisecraft: diffusion models made readable."""
