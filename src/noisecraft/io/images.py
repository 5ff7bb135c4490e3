"""Reading input pictures for img2img and inpainting: image files or .npz arrays -> tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import NoisecraftError


def _fit(im: Image.Image, channels: int, size: tuple[int, int] | None, resample) -> np.ndarray:
    """One PIL image converted to grey ("L") or RGB and resized to size (H, W) unless None: H×W×C uint8."""
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))       # transparent pixels become black
        im = Image.alpha_composite(background, im)
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), resample)
    arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise NoisecraftError(f"cannot read the image {path} ({e}); give a PNG or JPEG file.") from None


def load_images(path, channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file (PNG, JPEG, ...) or an .npz with key `images` (N×H×W×C or N×H×W uint8) as an
    N×C×H×W float tensor in [-1, 1], converted to `channels` (1 or 3) and resized to `size` (H, W), or kept at
    its own size when size is None."""
    path = Path(path)
    if not path.is_file():
        raise NoisecraftError(f"input {path} does not exist; give an image file or an .npz with key 'images'.")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path) as data:
                if "images" not in data.files:
                    raise NoisecraftError(f"{path} has no array 'images' (it has {', '.join(data.files) or 'none'}); "
                                          "save the pictures under the key 'images', N×H×W×C uint8.")
                arrays = data["images"]
        except (OSError, ValueError) as e:
            raise NoisecraftError(f"cannot read {path} as .npz ({e}); write it with numpy.savez.") from None
        if arrays.ndim == 3:
            arrays = arrays[..., None]
        if arrays.ndim != 4 or arrays.shape[-1] not in (1, 3) or arrays.shape[0] == 0:
            raise NoisecraftError(f"'images' in {path} must be N×H×W×C with C = 1 or 3, got {arrays.shape}.")
        arrays = np.clip(arrays, 0, 255).astype(np.uint8)
        pictures = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
    else:
        pictures = [_open(path)]
    batch = np.stack([_fit(im, channels, size, Image.Resampling.BICUBIC) for im in pictures])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_mask(path, size: tuple[int, int]) -> torch.Tensor:
    """A mask picture as an H×W float tensor in [0, 1], resized to `size`: white (1) = generate, black = keep."""
    path = Path(path)
    if not path.is_file():
        raise NoisecraftError(f"mask {path} does not exist; give a black-and-white image (white = region to generate).")
    arr = _fit(_open(path), 1, size, Image.Resampling.BILINEAR)
    return torch.from_numpy(arr[..., 0].copy()).float() / 255.0
