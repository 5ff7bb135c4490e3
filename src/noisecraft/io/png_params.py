"""Generation parameters that travel with the picture: PNG text chunks readable by people and other tools.

Every PNG noisecraft writes for one generated image (not grids) carries two text chunks:

- `parameters`: the string AUTOMATIC1111's webui writes (and ComfyUI, InvokeAI, civitai ... read): the prompt,
  then "Negative prompt: ..." if there is one, then one line of "Key: value" settings:

      a handwritten digit seven
      Negative prompt: a blurry digit
      Steps: 30, Sampler: ddpm, CFG scale: 4.0, Seed: 1237, Size: 28x28, Model: ldm, Spacing: leading

- `noisecraft`: JSON with everything needed to draw the same picture again: the model path, the job, the sampler
  and its options, the seed of the batch and the image's index in it (image i is drawn from seed + i), prompts,
  labels, size and the noisecraft version; `n` and `batch_size` say which batch the image was drawn in, since
  batched kernels round differently for different batch sizes (a difference of one grey level in a pixel or two).

`read_png_params` reads the JSON, else parses the `parameters` string of another tool as far as it goes. Neither
chunk is trusted: a missing, oversized or malformed one is refused with one sentence.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import NoisecraftError, brief
from .checkpoint import atomic_write_bytes

PARAMETERS_KEY = "parameters"       # AUTOMATIC1111's chunk
JSON_KEY = "noisecraft"             # ours
SCHEMA = 1
MAX_CHUNK_CHARS = 64 * 1024         # generation parameters are a few hundred bytes; anything huge is refused

# The JSON's fields and what each must hold (None is always allowed): name -> accepted Python types.
FIELDS: dict[str, tuple] = {
    "schema": (int,), "version": (str,), "model": (str,), "job": (str,), "sampler": (str,), "steps": (int,),
    "guidance": (int, float), "spacing": (str,), "eta": (int, float), "karras": (bool,), "variance": (str,),
    "seed": (int,), "index": (int,), "n": (int,), "batch_size": (int,), "prompt": (str,), "negative_prompt": (str,), "label": (int,),
    "negative_label": (int,), "height": (int,), "width": (int,), "strength": (int, float), "dtype": (str,),
    "model_config": (str,), "vae_tiling": (bool,), "mix_prompt": (str,), "mix": (int, float), "mix_tokens": (list,),
    "guide": (str,), "guide_scale": (int, float), "guide_every": (int,), "guide_mode": (str,),
    "guide_max_sigma": (int, float), "extra": (dict,),
}

# A1111 "Key" <-> our field, for the settings line.
_A1111 = {"Steps": "steps", "Sampler": "sampler", "CFG scale": "guidance", "Seed": "seed",
          "Denoising strength": "strength", "Eta": "eta", "Spacing": "spacing", "Label": "label",
          "Negative label": "negative_label", "Variance": "variance"}


def noisecraft_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("noisecraft")
    except PackageNotFoundError:
        return "unknown"


def image_seed(params: dict) -> int:
    """The seed that draws this one image as the first of a batch: seed + index (the pipeline uses seed + i)."""
    return int(params.get("seed") or 0) + int(params.get("index") or 0)


# --- writing -------------------------------------------------------------------------------------

def _quote(value) -> str:
    """A value of the settings line, quoted as A1111 does when it holds a comma, colon or line break."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def png_parameters_text(params: dict) -> str:
    """The AUTOMATIC1111 `parameters` string of a generation: prompt line(s), "Negative prompt: ..." when there is
    one, then "Steps: 50, Sampler: lms, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: name" and the other
    settings as "Key: value" pairs. Seed is the seed of this one image (seed + index)."""
    lines = []
    if params.get("prompt"):
        lines.append(str(params["prompt"]))
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    settings = []
    for key, field in (("Steps", "steps"), ("Sampler", "sampler"), ("CFG scale", "guidance")):
        if params.get(field) is not None:
            settings.append((key, _number(params[field])))
    settings.append(("Seed", str(image_seed(params))))
    if params.get("height") and params.get("width"):
        settings.append(("Size", f"{params['width']}x{params['height']}"))
    if params.get("model"):
        settings.append(("Model", Path(str(params["model"])).name or str(params["model"])))
    for key, field in (("Denoising strength", "strength"), ("Eta", "eta"), ("Spacing", "spacing"),
                       ("Label", "label"), ("Negative label", "negative_label"), ("Variance", "variance")):
        if params.get(field) is not None:
            settings.append((key, _number(params[field])))
    if params.get("karras"):
        settings.append(("Schedule type", "Karras"))
    if params.get("job"):
        settings.append(("Job", params["job"]))
    settings.append(("Version", f"noisecraft {params.get('version') or noisecraft_version()}"))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in settings))
    return "\n".join(lines)


def _image(image_uint8):
    from PIL import Image
    arr = np.asarray(image_uint8)
    if arr.dtype != np.uint8:
        raise NoisecraftError(f"a PNG is written from uint8 pixels, got {arr.dtype}; convert with viz.images.to_uint8.")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise NoisecraftError(f"a PNG is written from an H×W×C image with C = 1, 3 or 4, got shape {arr.shape}.")
    return Image.fromarray(np.ascontiguousarray(arr))


def params_json(params: dict) -> str:
    """The `noisecraft` chunk: the parameters with the schema and version filled in, as compact JSON."""
    full = {"schema": SCHEMA, "version": noisecraft_version(), **{k: v for k, v in params.items() if v is not None}}
    try:
        return json.dumps(full, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise NoisecraftError(f"the generation parameters cannot be stored as JSON ({brief(e)}); pass plain "
                              "numbers and strings.") from None


def write_png(path, image_uint8, params: dict, *, durable: bool = True, compress_level: int = 6) -> Path:
    """Write one H×W×C uint8 image as a PNG (atomically) carrying its generation parameters in the `parameters`
    (A1111) and `noisecraft` (JSON) text chunks. The UI passes durable=False, compress_level=1: its pictures can be
    redrawn from their settings, and the fsync alone took longer than a small model's whole generation."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, png_parameters_text(params))        # tEXt, or iTXt for non-Latin-1 text
    info.add_itxt(JSON_KEY, params_json(params))                       # UTF-8
    buf = io.BytesIO()
    _image(image_uint8).save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return atomic_write_bytes(path, buf.getvalue(), durable)


# --- reading -------------------------------------------------------------------------------------

def _text_chunks(path: Path) -> dict:
    from PIL import Image, UnidentifiedImageError
    if not path.is_file():
        raise NoisecraftError(f"{path} does not exist; give a PNG written by noisecraft (or AUTOMATIC1111).")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise NoisecraftError(f"{path} is a {im.format} file; generation parameters are read from PNGs only.")
            chunks = dict(getattr(im, "text", None) or {})    # loads chunks after the pixels too
            return {k: v for k, v in {**im.info, **chunks}.items() if k in (JSON_KEY, PARAMETERS_KEY)}
    except NoisecraftError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise NoisecraftError(f"cannot read the PNG {path} ({brief(e, 120)}); give an intact PNG written by "
                              "noisecraft.") from None


def _check(params: dict, path) -> dict:
    """The JSON's fields, type-checked; unknown keys are dropped (a newer noisecraft may add some)."""
    clean = {}
    for key, value in params.items():
        if key not in FIELDS or value is None:
            continue
        kinds = FIELDS[key]
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if ok and key == "mix_tokens":
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            raise NoisecraftError(f"the noisecraft parameters in {path} are corrupt ({key} = {str(value)[:40]!r}); "
                                  "the picture cannot be reproduced from them.")
        clean[key] = value
    return clean


def _parse_json(text: str, path) -> dict:
    if len(text) > MAX_CHUNK_CHARS:
        raise NoisecraftError(f"the noisecraft parameters in {path} are {len(text)} characters long, far more than "
                              "any generation needs; the chunk is refused as corrupt or hostile.")
    try:
        params = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise NoisecraftError(f"the noisecraft parameters in {path} are not valid JSON ({brief(e, 80)}); the "
                              "chunk is corrupt.") from None
    if not isinstance(params, dict):
        raise NoisecraftError(f"the noisecraft parameters in {path} must be a JSON object, got "
                              f"{type(params).__name__}; the chunk is corrupt.")
    return _check(params, path)


_PAIR = re.compile(r'\s*([\w][\w \-/+.()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SETTINGS_START = re.compile(r"^\s*Steps:\s*\d+", re.MULTILINE)


def _value(raw: str):
    raw = raw.strip()
    if raw.startswith('"'):
        try:
            return json.loads(raw)
        except ValueError:
            return raw.strip('"')
    return raw


def _to_number(text, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        return None
    return value if kind is int or math.isfinite(value) else None


def parse_parameters_text(text: str) -> dict:
    """AUTOMATIC1111's `parameters` string as our fields, as far as they map: prompt, negative_prompt, steps,
    sampler (its names, e.g. "DPM++ 2M Karras", are our aliases), guidance (CFG scale), seed, height/width
    (Size: WxH), model (a name, not a path), strength, eta, karras ("Schedule type: Karras"); other settings
    are kept as strings under "extra"."""
    text = str(text).replace("\r\n", "\n")
    lines = text.split("\n")
    settings_line = ""
    if lines and _SETTINGS_START.match(lines[-1]):
        settings_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params: dict = {"job": "txt2img"}
    if "\n".join(prompt).strip():
        params["prompt"] = "\n".join(prompt).strip()
    if "\n".join(negative).strip():
        params["negative_prompt"] = "\n".join(negative).strip()
    extra = {}
    for key, raw in _PAIR.findall(settings_line):
        key, value = key.strip(), _value(raw)
        field = _A1111.get(key)
        if key == "Size":
            match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(value))
            if match:
                params["width"], params["height"] = int(match.group(1)), int(match.group(2))
                continue
        elif key == "Model":
            params["model"] = str(value)
            continue
        elif key == "Schedule type":
            params["karras"] = str(value).strip().lower() == "karras"
            continue
        elif field in ("steps", "seed", "label", "negative_label"):
            number = _to_number(value, int)
            if number is not None:
                params[field] = number
                continue
        elif field in ("guidance", "strength", "eta"):
            number = _to_number(value, float)
            if number is not None:
                params[field] = number
                continue
        elif field is not None:
            params[field] = str(value)
            continue
        extra[key] = str(value)
    if extra:
        params["extra"] = extra
    return params


def read_png_params(path) -> dict:
    """The generation parameters of a PNG: our JSON chunk (type-checked), else the A1111 `parameters` string
    parsed as far as it goes (then "source" is "parameters"). A PNG with neither, or a corrupt or oversized chunk,
    raises NoisecraftError with one sentence."""
    path = Path(path)
    chunks = _text_chunks(path)
    if JSON_KEY in chunks:
        params = _parse_json(str(chunks[JSON_KEY]), path)
        params["source"] = JSON_KEY
        return params
    if PARAMETERS_KEY in chunks:
        text = str(chunks[PARAMETERS_KEY])
        if len(text) > MAX_CHUNK_CHARS:
            raise NoisecraftError(f"the parameters text in {path} is {len(text)} characters long, far more than any "
                                  "generation needs; the chunk is refused as corrupt or hostile.")
        params = parse_parameters_text(text)
        params["source"] = PARAMETERS_KEY
        return params
    raise NoisecraftError(f"{path} carries no generation parameters (no 'noisecraft' or 'parameters' text chunk); "
                          "give a PNG written with --png-dir or by the UI.")
