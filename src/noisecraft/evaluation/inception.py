"""The Inception-v3 network of standard FID (Heusel et al., 2017), in the TensorFlow variant of pytorch-fid.

Published FID numbers come from TensorFlow's `inception-2015-12-05` graph. pytorch-fid ported its weights to
PyTorch (`pt_inception-2015-12-05-6726825d.pth`, a plain state dict) together with the few places where
that graph differs from torchvision's Inception-v3 (Szegedy et al., 2016, "Rethinking the Inception
Architecture"):

- the average pools inside the 35x35, 17x17 and first 8x8 mixed blocks (Mixed_5*, Mixed_6b-e, Mixed_7b)
  ignore the zero padding when averaging (`count_include_pad=False`);
- the pool branch of the last block (Mixed_7c) is a 3x3 *max* pool, not an average pool;
- the classifier has 1008 outputs (`fc`), and BatchNorm uses eps = 0.001.

The modules below carry the same attribute names as that checkpoint (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.bias`), so it loads by name, with no conversion table. Weights
are only ever read from a local file the user gives (`load_fid_inception`); nothing is downloaded.

Preprocessing follows pytorch-fid: bilinear resize to 299x299 (`align_corners=False`, no antialiasing),
values in [-1, 1], grey images repeated to three channels. The FID features are the 2048 channels of
the global average pool after Mixed_7c.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NoisecraftError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001, as in TensorFlow), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's "SAME" average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1 (pool_features channels)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: strided 3x3 | 1x1 -> 3x3 -> strided 3x3 | strided max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1) of width channels_7x7."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(_avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1 -> strided 3x3 | 1x1 -> 1x7 -> 7x1 -> strided 3x3 | strided max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            seven,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 heads; `max_pool` selects the pool of the last block (Mixed_7c)."""

    def __init__(self, c_in: int, max_pool: bool = False):
        super().__init__()
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(c_in, 192, 1)
        # The TF graph behind FID max-pools here (torchvision and the paper average-pool).
        self.pool = _max_pool_3x3 if max_pool else _avg_pool_3x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(self.pool(x)),
        ], dim=1)


class FIDInception(nn.Module):
    """Inception-v3 as used for FID: `forward(images) -> N x 2048` pool features.

    `images`: float N x C x H x W in [-1, 1] with C = 1 (repeated to RGB) or 3, any H and W (resized to
    299 x 299 bilinearly, as pytorch-fid does). `logits(images)` gives the 1008 class scores of the
    checkpoint's classifier (for an Inception Score). Build it with random weights, then `load_fid_inception`
    or `load_state_dict` the pytorch-fid state dict.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()
        self.requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Grey -> RGB, then bilinear resize to 299 x 299 (values stay in [-1, 1])."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise NoisecraftError(
                f"The Inception network takes N x C x H x W images with 1 or 3 channels, got shape "
                f"{tuple(images.shape)}; convert the images to grey or RGB."
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # 64 x 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                       # 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # 192 x 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                    # ... 2048 x 8 x 8
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))


# --------------------------------------------------------------------------------------------------
# loading (local files only)


def _read_state_dict(path: Path) -> dict:
    """A state dict from a safetensors file or a torch file (weights only), told apart by content."""
    from ..io.checkpoint import load_torch, load_weights

    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; torch files are zip archives.
    if len(head) == 9 and head[8:9] == b"{":
        return load_weights(path)
    state = load_torch(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NoisecraftError(f"{path} does not hold a state dict of tensors; give the pytorch-fid weights file "
                              f"{FID_WEIGHTS_NAME}.")
    return state


def _list_keys(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_fid_inception(path, device: str | torch.device = "cpu") -> FIDInception:
    """The FID Inception network with the pytorch-fid weights read from a local file.

    `path`: `pt_inception-2015-12-05-6726825d.pth` from the pytorch-fid releases (torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth` uses the same names), or the same tensors as safetensors.
    It is read with `torch.load(weights_only=True)`, never unpickled. BatchNorm's `num_batches_tracked`
    counters may be absent; every other key must match by name and shape. Returns the model in eval mode.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise NoisecraftError(f"Inception weights file {path} does not exist; download {FID_WEIGHTS_NAME} from the "
                              f"pytorch-fid releases and pass its local path.")
    state = _read_state_dict(path)
    model = FIDInception()
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = ([f"missing keys {_list_keys(missing)}"] if missing else []) + \
                ([f"unexpected keys {_list_keys(unexpected)}"] if unexpected else [])
        raise NoisecraftError(f"{path} is not a pytorch-fid Inception state dict ({'; '.join(parts)}); give the "
                              f"file {FID_WEIGHTS_NAME}.")
    wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise NoisecraftError(f"{path} has tensors of the wrong shape ({'; '.join(wrong[:3])}); give the file "
                              f"{FID_WEIGHTS_NAME}.")
    model.load_state_dict({**{k: expected[k] for k in optional}, **state})
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# features of image sets


@torch.no_grad()
def inception_features(model: FIDInception, images, batch_size: int = 50) -> np.ndarray:
    """2048-d pool features (N x 2048, float64 numpy) of uint8 (0..255) or float [-1, 1] images, N x C x H x W."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        raise NoisecraftError("Inception features need a non-empty image tensor of shape N x C x H x W.")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        out.append(model(x.to(param.device, param.dtype)).double().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()
