"""Turn image tensors into pictures: grids, captioned strips and animated GIFs.

Images in the API are float tensors in [-1, 1] with shape N x C x H x W (C = 1 or 3); pictures on disk
are uint8. Small images (16 x 16 or 28 x 28) are upscaled by an integer factor with nearest-neighbour
sampling, so every pixel stays a crisp square. Each `save_*` function writes atomically: it writes a
temporary file beside the target and renames it into place, so a reader never sees half a file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import NoisecraftError
from ..io.checkpoint import atomic_write

MIN_CELL_PX = 64  # save_* functions upscale each image until its longer side is at least this many pixels
CAPTION_MARGIN = 4  # pixels of space around caption text


# --------------------------------------------------------------------------------------------------
# tensors -> arrays -> PIL images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Map images in [-1, 1] (N x C x H x W, or one C x H x W image) to an N x H x W x C uint8 array.

    Pixel value = round((x + 1) * 127.5), clamped to [0, 255]; NaN becomes mid-grey (128) rather than
    an undefined byte, so a broken sample is visible instead of crashing the writer.
    """
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise NoisecraftError(
            f"Expected images shaped N x C x H x W with C = 1 or 3, got shape {tuple(images.shape)}; "
            "pass a batch of grayscale or RGB images."
        )
    x = images.detach().to("cpu", torch.float32).nan_to_num(0.0)
    x = torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an N x H x W x C array by an integer factor."""
    if scale < 1 or int(scale) != scale:
        raise NoisecraftError(f"scale must be a positive integer, got {scale!r}; use 1 for original size.")
    if scale == 1:
        return arr
    return arr.repeat(scale, axis=1).repeat(scale, axis=2)


def _tile(cells: np.ndarray, ncol: int, padding: int, fill: int) -> np.ndarray:
    """Place N x h x w x C cells row by row, `ncol` per row, with `padding` pixels around each cell."""
    n, h, w, c = cells.shape
    nrows = math.ceil(n / ncol)
    canvas = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), fill, np.uint8)
    for i, cell in enumerate(cells):
        row, col = divmod(i, ncol)
        y, x = padding + row * (h + padding), padding + col * (w + padding)
        canvas[y : y + h, x : x + w] = cell
    return canvas


def _to_pil(arr: np.ndarray) -> Image.Image:
    """H x W x 1 -> grayscale ("L") image; H x W x 3 -> "RGB" image."""
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def make_grid(
    images: torch.Tensor,
    nrow: int | None = None,
    padding: int = 2,
    scale: int = 1,
    pad_value: int = 0,
) -> Image.Image:
    """Arrange a batch of images in a grid with `nrow` images per row (default ceil(sqrt(N))).

    Each image is first upscaled `scale` times (nearest neighbour); `padding` pixels of grey level
    `pad_value` (0-255) separate the cells and frame the grid, and empty trailing cells are filled with it.
    The result is a grayscale "L" image for C = 1 and "RGB" for C = 3. Size for N images of H x W:
    width = ncol * (W * scale + padding) + padding, height = nrows * (H * scale + padding) + padding,
    with ncol = min(nrow, N) and nrows = ceil(N / ncol).
    """
    arr = _upscale(to_uint8(images), scale)
    n = arr.shape[0]
    if n == 0:
        raise NoisecraftError("Cannot make a grid of zero images; pass at least one image.")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1:
        raise NoisecraftError(f"nrow must be at least 1, got {nrow}; it is the number of images per row.")
    return _to_pil(_tile(arr, min(nrow, n), padding, pad_value))


def auto_scale(height: int, width: int, min_px: int = MIN_CELL_PX) -> int:
    """Smallest integer factor that makes the longer side of an H x W image at least `min_px` pixels."""
    return max(1, math.ceil(min_px / max(height, width, 1)))


# --------------------------------------------------------------------------------------------------
# captions


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in default font, at `size` pixels where this Pillow build can scale it."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _font_size(cell_height: int) -> int:
    """A readable caption size for cells `cell_height` pixels tall: 11-20 px."""
    return int(min(20, max(11, cell_height // 6)))


def _text_size(font, text: str) -> tuple[int, int]:
    """Width and height in pixels of `text` drawn in `font` (0 x 0 for empty text)."""
    if not text:
        return 0, 0
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _with_margins(image: Image.Image, left: int, bottom: int, fill: str) -> Image.Image:
    """A copy of `image` with `left` extra pixels on the left and `bottom` below, filled with `fill`."""
    out = Image.new(image.mode, (image.width + left, image.height + bottom), fill)
    out.paste(image, (left, 0))
    return out


def _draw_centered(draw: ImageDraw.ImageDraw, font, text: str, cx: float, cy: float, fill: str) -> None:
    """Draw `text` so that its bounding box is centred on (cx, cy)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((cx - (left + right) / 2, cy - (top + bottom) / 2), text, font=font, fill=fill)


def _caption_below(image: Image.Image, text: str, font, fill: str, background: str) -> Image.Image:
    """`image` with a band underneath holding `text`, centred."""
    band = _text_size(font, "Ag")[1] + 2 * CAPTION_MARGIN
    out = _with_margins(image, 0, band, background)
    _draw_centered(ImageDraw.Draw(out), font, text, out.width / 2, image.height + band / 2, fill)
    return out


# --------------------------------------------------------------------------------------------------
# writing files


def _save_image(image: Image.Image, path: str | os.PathLike, **params) -> Path:
    """Save a PIL image atomically; the format comes from the file extension (e.g. .png, .jpg, .gif)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise NoisecraftError(
            f"Cannot tell the image format of {str(path)!r} from its extension; use a name ending in .png."
        )
    if fmt == "JPEG" and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **params))


def _cell_scale(images: torch.Tensor, scale: int | None) -> int:
    """`scale`, or the automatic factor for these images (last two dimensions are H, W) when None."""
    return auto_scale(images.shape[-2], images.shape[-1]) if scale is None else scale


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write a batch of images as one grid picture (see `make_grid`); returns the path written.

    `scale=None` picks the smallest integer upscaling that makes each cell at least ~64 px.
    """
    grid = make_grid(images, nrow=nrow, scale=_cell_scale(images, scale))
    return _save_image(grid, path)


def save_gif(
    frames: list[torch.Tensor],
    path,
    nrow: int | None = None,
    scale: int | None = None,
    duration_ms: int = 80,
    hold_last_ms: int = 1500,
    captions: list[str] | None = None,
) -> Path:
    """Write an animated GIF whose frames are grids of the given N x C x H x W batches.

    Typical use: the batch x_t at a few steps of a sampler, so the noise visibly resolves into images.
    Each frame shows for `duration_ms`, the last one for `hold_last_ms`; the animation loops forever.
    `captions` (one per frame, e.g. "step 10/50") are drawn in white under each frame.
    Note: GIF writers merge consecutive identical frames, so a viewer may count fewer frames.
    """
    frames = list(frames)
    if not frames:
        raise NoisecraftError("save_gif got no frames; pass a list with at least one N x C x H x W batch.")
    if captions is not None and len(captions) != len(frames):
        raise NoisecraftError(f"save_gif got {len(frames)} frames but {len(captions)} captions; pass one per frame.")
    if any(tuple(f.shape) != tuple(frames[0].shape) for f in frames):
        raise NoisecraftError("save_gif needs every frame to have the same shape; pass batches of equal size.")
    s = _cell_scale(frames[0], scale)
    pictures = [make_grid(f, nrow=nrow, scale=s) for f in frames]
    if captions is not None:
        font = _font(_font_size(frames[0].shape[-2] * s))
        pictures = [_caption_below(p, c, font, "white", "black") for p, c in zip(pictures, captions)]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    return _save_image(
        pictures[0], path, save_all=True, append_images=pictures[1:], duration=durations, loop=0
    )


def save_strip(
    images: torch.Tensor,
    path,
    captions: list[str] | None = None,
    scale: int | None = None,
    rows: list[str] | None = None,
) -> Path:
    """Write images side by side with a caption under each column, e.g. x_t at t = 0, 250, ..., 999.

    `images` is N x C x H x W for one row, or R x N x C x H x W for R rows (e.g. x_t above the predicted
    x0); `rows` optionally names each row with a title at the left. Black text on white.
    """
    if images.dim() == 4:
        images = images.unsqueeze(0)
    if images.dim() != 5:
        raise NoisecraftError(
            f"save_strip expects N x C x H x W or R x N x C x H x W images, got shape {tuple(images.shape)}."
        )
    n_rows, n_cols = images.shape[:2]
    if captions is not None and len(captions) != n_cols:
        raise NoisecraftError(f"save_strip got {n_cols} images per row but {len(captions)} captions; pass one each.")
    if rows is not None and len(rows) != n_rows:
        raise NoisecraftError(f"save_strip got {n_rows} rows but {len(rows)} row titles; pass one per row.")
    s, padding = _cell_scale(images, scale), 2
    grid = make_grid(images.flatten(0, 1), nrow=n_cols, padding=padding, scale=s, pad_value=255)
    cell_h, cell_w = images.shape[-2] * s, images.shape[-1] * s
    font = _font(_font_size(cell_h))
    left = max((_text_size(font, t)[0] for t in rows), default=0) + 2 * CAPTION_MARGIN if rows else 0
    bottom = _text_size(font, "Ag")[1] + 2 * CAPTION_MARGIN if captions else 0
    out = _with_margins(grid, left, bottom, "white")
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(captions or []):
        cx = left + padding + j * (cell_w + padding) + cell_w / 2
        _draw_centered(draw, font, text, cx, grid.height + bottom / 2, "black")
    for i, text in enumerate(rows or []):
        _draw_centered(draw, font, text, left / 2, padding + i * (cell_h + padding) + cell_h / 2, "black")
    return _save_image(out, path)
