"""A small CNN classifier whose features drive the FID-style "domain score".

Inception-v3 FID needs a 100 MB network trained on ImageNet photos and says little about 28x28 digits.
Here we instead train a small convolutional classifier on the dataset itself and use its penultimate
layer (a 128-d vector after global average pooling) as the feature space for the Fréchet distance in
`noisecraft.evaluation.fid`. Scores computed this way are only comparable with scores computed by the
same classifier (same dataset, same `CLASSIFIER_VERSION`); they are NOT comparable with published
Inception FID numbers.

The network is all convolutions followed by a global average pool, so it accepts any image size >= 8
and any number of channels fixed at construction. Weights are stored as safetensors plus a small JSON
config (never pickle). Each dataset has a training recipe (`recipe_for`): the grey 28×28 sets use the
default one; CIFAR-10 gets a max-pooling network with 256 features, flips and shifts, and more steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NoisecraftError
from ..io.checkpoint import atomic_write_bytes

# Bump this whenever the architecture, the training recipe or the preprocessing changes: cached
# classifiers (and therefore every domain score) are keyed by it.
CLASSIFIER_VERSION = "v1"

# The training recipe used by `load_or_train_classifier`.
DEFAULT_STEPS = 300
DEFAULT_BATCH_SIZE = 128
DEFAULT_SEED = 0
ARCHES = ("small", "pooled")


@dataclass(frozen=True)
class Recipe:
    """How the classifier of one dataset is built and trained (see `recipe_for`)."""

    arch: str = "small"
    width: int = 32
    feature_dim: int = 128
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 2e-3
    augment: bool = False     # random horizontal flips and shifts of up to 4 pixels: for photos, not digits


# CIFAR-10 (canonical or JPEG copy): 32×32 photos need more capacity than digits and, with ~2 epochs at most on a
# CPU budget, flips and shifts. On the JPEG copy, one thread: 71.6% test accuracy after 800 steps, which took 175 s
# of CPU time (223 s wall on a busy 2-core machine); the same net reached 66% after 400-500 steps.
CIFAR10_RECIPE = Recipe(arch="pooled", width=32, feature_dim=256, steps=800, lr=3e-3, augment=True)


def recipe_for(dataset_name: str) -> Recipe:
    """The training recipe of a dataset's classifier: CIFAR-10's for "cifar10" and "cifar10-jpeg", else the
    default (which the MNIST numbers in this module's docs were measured with)."""
    key = str(dataset_name).strip().lower().replace("_", "-")
    return CIFAR10_RECIPE if key in ("cifar10", "cifar-10", "cifar10-jpeg", "cifar-10-jpeg") else Recipe()


class SmallClassifier(nn.Module):
    """A small all-convolutional classifier: conv body, global average pool, linear head.

    arch "small" (the default, for 28×28 digits): five 3x3 conv + BatchNorm + ReLU stages, two of which
    downsample by 2 (stride). arch "pooled" (for 32×32 photos): four such stages of width w, 2w, 4w and
    `feature_dim`, each of the first three followed by a 2×2 max-pool, so most of the work happens at 16×16
    and below (about 15 M multiply-adds per 32×32 image at w=32, feature_dim=256).

    `features(x)` returns the pooled `feature_dim`-vector (the penultimate layer); `forward(x)` returns
    class logits. Inputs are float images in [-1, 1], shape N x C x H x W with H, W >= 8. BatchNorm makes a
    few hundred Adam steps enough; in eval mode (which every function here uses for features) it applies
    its fixed running statistics, so an image's features do not depend on the rest of its batch.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128,
                 arch: str = "small"):
        super().__init__()
        if arch not in ARCHES:
            raise NoisecraftError(f"Unknown classifier architecture {arch!r}; use one of {', '.join(ARCHES)}.")
        self.config = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "width": int(width),
            "feature_dim": int(feature_dim),
            "arch": arch,
        }
        w = width

        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        if arch == "pooled":
            self.body = nn.Sequential(
                *block(in_channels, w), nn.MaxPool2d(2),       # H/2
                *block(w, 2 * w), nn.MaxPool2d(2),             # H/4
                *block(2 * w, 4 * w), nn.MaxPool2d(2),         # H/8
                *block(4 * w, feature_dim),
            )
        else:
            self.body = nn.Sequential(
                *block(in_channels, w),
                *block(w, w, stride=2),            # H/2
                *block(w, 2 * w),
                *block(2 * w, 2 * w, stride=2),    # H/4
                *block(2 * w, feature_dim),
            )
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: conv body, then global average pool -> N x feature_dim."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------------
# input handling


def _as_float_images(images, in_channels: int | None = None) -> torch.Tensor:
    """Turn uint8 images (0..255) or float images in [-1, 1] (tensor or numpy, N x C x H x W) into a float tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise NoisecraftError(
            f"Expected images as a torch tensor or numpy array of shape N x C x H x W, got {type(images).__name__}."
        )
    if images.ndim != 4:
        raise NoisecraftError(
            f"Expected images of shape N x C x H x W, got shape {tuple(images.shape)}; add the missing axes."
        )
    if in_channels is not None and images.shape[1] != in_channels:
        raise NoisecraftError(
            f"The classifier expects {in_channels}-channel images (N x C x H x W) but got {images.shape[1]} "
            f"channels (shape {tuple(images.shape)}); convert the images or use a classifier for this dataset."
        )
    if images.shape[2] < 8 or images.shape[3] < 8:
        raise NoisecraftError(
            f"Images must be at least 8x8 pixels for the classifier, got {images.shape[2]}x{images.shape[3]}."
        )
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise NoisecraftError(
            f"Expected uint8 images (0..255) or float images in [-1, 1], got dtype {images.dtype}."
        )
    return images.float()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _flip_and_shift(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2, then shifted by up to `pad` pixels each way (the
    border filled by reflection): the usual augmentation for small photos."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


# --------------------------------------------------------------------------------------------------
# training and evaluation


def train_classifier(
    dataset,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    device: str | torch.device = "cpu",
    lr: float = 2e-3,
    progress: bool = False,
    *,
    arch: str = "small",
    width: int = 32,
    feature_dim: int = 128,
    augment: bool = False,
) -> SmallClassifier:
    """Train a `SmallClassifier` on a labelled `ImageDataset` with Adam and cross-entropy.

    Minibatches are drawn uniformly with replacement from a generator seeded by `seed`, so the same seed
    gives the same weights (on the same device and torch build). The learning rate is held for the first
    half and then decays linearly to zero, which gets a few hundred steps a long way. `augment` flips and
    shifts every training image at random (`_flip_and_shift`). The "pooled" network trains in channels-last
    memory order, about a quarter faster on a CPU. Returns the model in eval mode.
    """
    if getattr(dataset, "labels", None) is None:
        raise NoisecraftError(
            "The classifier for the domain score needs a labelled dataset, but this dataset has no labels."
        )
    if steps < 1 or batch_size < 1:
        raise NoisecraftError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}.")
    n = len(dataset.images)
    in_channels = int(dataset.images.shape[1])
    with torch.random.fork_rng(devices=[]):  # seeded weight initialisation, global RNG left untouched
        torch.manual_seed(seed)
        model = SmallClassifier(in_channels=in_channels, num_classes=int(dataset.num_classes), width=width,
                                feature_dim=feature_dim, arch=arch)
    layout = torch.channels_last if arch == "pooled" else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, 2.0 * (1.0 - step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="classifier", unit="step")
    model.train()
    for _ in iterator:
        indices = torch.randint(0, n, (batch_size,), generator=generator)
        x, y = dataset.batch(indices)
        if augment:
            x = _flip_and_shift(x, generator)
        x, y = x.to(device, memory_format=layout), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            iterator.set_postfix(loss=f"{loss.item():.3f}")
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def map_batches(model: SmallClassifier, images, batch_size: int, fn) -> torch.Tensor:
    """fn(batch) over `images` (uint8 or float, any layout the classifier accepts) in eval mode, batch by batch,
    concatenated on the CPU: features, logits or predictions of a whole set without holding its activations."""
    images = _as_float_images(images, model.in_channels)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out = [fn(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    if not out:
        raise NoisecraftError("No images were given; pass at least one image.")
    return torch.cat(out)


def classifier_features(model: SmallClassifier, images, batch_size: int = 500) -> np.ndarray:
    """Penultimate-layer features (N x feature_dim, float64 numpy) of uint8 or [-1, 1] float images."""
    return map_batches(model, images, batch_size, model.features).double().numpy()


def predict(model: SmallClassifier, images, batch_size: int = 500) -> torch.Tensor:
    """Predicted class index for each image (int64 tensor of length N)."""
    return map_batches(model, images, batch_size, lambda x: model(x).argmax(dim=1))


def accuracy(model: SmallClassifier, dataset, batch_size: int = 500) -> float:
    """Fraction of `dataset.images` whose predicted class equals `dataset.labels`."""
    if getattr(dataset, "labels", None) is None:
        raise NoisecraftError("Accuracy needs a labelled dataset, but this dataset has no labels.")
    predicted = predict(model, dataset.images, batch_size)
    return float((predicted == dataset.labels.cpu()).double().mean())


# --------------------------------------------------------------------------------------------------
# saving and loading (safetensors + JSON, atomic writes)


def save_classifier(model: SmallClassifier, directory, extra: dict | None = None) -> Path:
    """Write `classifier.safetensors` and `classifier.json` into `directory` (created if needed)."""
    from safetensors.torch import save as save_tensors

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"version": CLASSIFIER_VERSION, "config": model.config, **(extra or {})}
    # Weights first, JSON last: a directory with a JSON file is a complete one.
    atomic_write_bytes(directory / "classifier.safetensors", save_tensors(state))
    atomic_write_bytes(directory / "classifier.json", (json.dumps(meta, indent=2) + "\n").encode())
    return directory


def load_classifier(directory, device: str | torch.device = "cpu") -> SmallClassifier:
    """Rebuild a classifier saved by `save_classifier`; returns it in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    json_path, weights_path = directory / "classifier.json", directory / "classifier.safetensors"
    if not json_path.is_file() or not weights_path.is_file():
        raise NoisecraftError(
            f"No saved classifier in {directory}; expected classifier.json and classifier.safetensors there."
        )
    try:
        meta = json.loads(json_path.read_text())
        model = SmallClassifier(**meta["config"])
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as exc:  # corrupt or mismatched files
        raise NoisecraftError(
            f"The classifier in {directory} could not be loaded ({exc}); delete that directory to retrain it."
        ) from exc
    return model.to(device).eval()


def default_cache_dir(data_dir=None) -> Path:
    """`$NOISECRAFT_CACHE`, else `~/.cache/noisecraft/classifiers`.

    Not beside the data: a shared or read-only data folder must never be written to.
    """
    env = os.environ.get("NOISECRAFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "noisecraft" / "classifiers"


def cache_key(dataset_name: str, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED) -> str:
    """Folder name of a cached classifier: dataset name, `CLASSIFIER_VERSION`, steps and seed.

    Names with characters unsafe in a folder name (e.g. "folder:/my/images") are sanitised and get a short
    hash of the original name, so two different folders never share a classifier.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset_name).strip("._") or "dataset"
    if safe != dataset_name:
        safe = f"{safe[-40:]}-{hashlib.sha256(dataset_name.encode()).hexdigest()[:8]}"
    return f"{safe}-{CLASSIFIER_VERSION}-s{steps}-seed{seed}"


def _load_dataset(name: str, split: str, data_dir):
    from ..data.datasets import load_dataset

    return load_dataset(name, split=split, data_dir=data_dir)


def _dataset_name(name: str, data_dir) -> str:
    from ..data.datasets import dataset_name_for

    return dataset_name_for(name, data_dir)


def classifier_directory(dataset_name: str, data_dir=None, cache_dir=None, steps: int | None = None,
                         seed: int = DEFAULT_SEED) -> Path:
    """The folder `load_or_train_classifier` caches this dataset's classifier in. The name is the one the dataset
    loads under ("cifar10" is "cifar10-jpeg" when only the JPEG copy is there), so classifiers, and the scores
    they give, never mix the two; `steps` defaults to the dataset's recipe."""
    name = _dataset_name(dataset_name, data_dir)
    steps = recipe_for(name).steps if steps is None else steps
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_dir)
    return cache_dir / cache_key(name, steps, seed)


def load_or_train_classifier(
    dataset_name: str,
    data_dir=None,
    cache_dir=None,
    device: str | torch.device = "cpu",
    steps: int | None = None,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> SmallClassifier:
    """The evaluation classifier for a named dataset: load it from the cache, or train and cache it.

    The cache lives in `cache_dir/<dataset_name>-<CLASSIFIER_VERSION>-s<steps>-seed<seed>/` (see
    `classifier_directory`; default cache dir: `default_cache_dir()`, i.e. ~/.cache/noisecraft/classifiers).
    Training follows the dataset's recipe (`recipe_for`; `steps` overrides its step count) on the train split at
    its native size; the test-split accuracy and the training time are recorded in the JSON file next to the
    weights. With one thread on a 2-core machine: MNIST's 300 default steps take about 40 s and reach about
    98.7% test accuracy; CIFAR-10's 800 steps (about two epochs) take about 3 CPU-minutes and reach 71.6% on the
JPEG copy's test split (features, not accuracy, are the point).
    """
    name = _dataset_name(dataset_name, data_dir)
    recipe = recipe_for(name)
    steps = recipe.steps if steps is None else steps
    directory = classifier_directory(name, data_dir, cache_dir, steps, seed)
    if (directory / "classifier.json").is_file():
        return load_classifier(directory, device)

    train = _load_dataset(name, "train", data_dir)
    start = time.perf_counter()
    model = train_classifier(train, steps=steps, batch_size=recipe.batch_size, seed=seed, device=device,
                             lr=recipe.lr, progress=progress, arch=recipe.arch, width=recipe.width,
                             feature_dim=recipe.feature_dim, augment=recipe.augment)
    seconds = time.perf_counter() - start
    extra = {"dataset": name, "steps": steps, "batch_size": recipe.batch_size, "seed": seed, "lr": recipe.lr,
             "augment": recipe.augment, "train_seconds": round(seconds, 1), "threads": torch.get_num_threads()}
    try:
        extra["test_accuracy"] = round(accuracy(model, _load_dataset(name, "test", data_dir)), 4)
    except NoisecraftError:
        pass  # a dataset without a labelled test split still gets a classifier
    save_classifier(model, directory, extra)
    return model
