"""Import the benchmark-only peer libraries (denoising-diffusion-pytorch, smalldiffusion) with a clear message.

Both libraries import torchvision at module level, but only for parts the peer recipes do not use (image-folder
datasets, the image transforms of their example scripts, `save_image` in lucidrains' `Trainer`). PyPI has no
CPU build of torchvision: next to the CPU build of torch that noisecraft installs, the torchvision wheel from
PyPI either pulls in a CUDA build of torch or, pinned to the same torch version, fails to load its compiled
operators. So when torchvision cannot be imported, `import_peer` puts a placeholder module in its place for the
duration of the import only; anything that really needs torchvision then fails when called, not at import.
"""

from __future__ import annotations

import importlib
import sys
import types

from noisecraft.errors import NoisecraftError

INSTALL_HINT = "pip install -r benchmarks/requirements.txt (add --no-deps next to a CPU build of torch; see its header)"


class _TorchvisionUnavailable:
    """Stands in for any torchvision class or function; using it (not merely creating it) raises."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not importable here, and this code path of a peer library needs it.")


def _placeholder(name: str) -> types.ModuleType:
    def getattr_(attr: str):  # PEP 562 module __getattr__: any public name is a placeholder
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _TorchvisionUnavailable

    module = types.ModuleType(name)
    module.__getattr__ = getattr_
    return module


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # RuntimeError: a wheel built for another torch
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        return False
    return True


def import_peer(module: str, package: str):
    """Import `module` of the pip package `package`; raise NoisecraftError saying what to install if it is missing."""
    if sys.modules.get(module) is not None:
        return sys.modules[module]
    import torch  # noqa: F401  (before any placeholder exists: torch's import walks sys.modules)

    shimmed = []
    if not _torchvision_importable():
        for name in ("torchvision", "torchvision.transforms", "torchvision.utils"):
            sys.modules[name] = _placeholder(name)
            shimmed.append(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NoisecraftError(
            f"The {package} peer recipe needs {package} and its dependencies ({exc}); "
            f"install them with {INSTALL_HINT}."
        ) from exc
    finally:
        for name in shimmed:
            sys.modules.pop(name, None)
