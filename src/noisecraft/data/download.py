"""Fetch the MNIST-style IDX files once, verify them, and cache them under the data folder."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import NoisecraftError

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# SHA-256 of each file's *gunzipped* IDX bytes, not of the .gz file itself. Mirrors serve different
# gzip encodings of the same data: the MNIST copy in ../shared/data is re-compressed (its gz MD5s
# differ from torchvision's f68b3c2d.../d53e105e.../9fb629c4.../ec29112d...) while its contents match
# the published content MD5s (6bbc9ace.../a25bea73.../2646ac64.../27ae3e4e...). Hashing the contents
# accepts every faithful mirror and still rejects any changed pixel or label.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The Fashion-MNIST gz files here are byte-identical to the authors' (MD5s equal torchvision's
# 8d4fb7e6.../25c81989.../bef4ecab.../bb300cfd...); these are again content hashes.
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where one IDX dataset lives: its sub-folder, its files with checksums, its mirror."""

    title: str  # for messages, e.g. "Fashion-MNIST"
    folder: str  # sub-folder of the data directory
    files: dict[str, str]  # file name -> SHA-256 of the gunzipped contents
    url: str  # default base URL
    url_env: str  # environment variable that overrides the base URL

    def base_url(self, override: str | None = None) -> str:
        return override or os.environ.get(self.url_env) or self.url


SOURCES = {
    "mnist": Source("MNIST", "mnist", MNIST_FILES, MNIST_URL, "NOISECRAFT_MNIST_URL"),
    "fashion-mnist": Source(
        "Fashion-MNIST", "fashion-mnist", FASHION_MNIST_FILES, FASHION_MNIST_URL,
        "NOISECRAFT_FASHION_MNIST_URL",
    ),
}


def content_sha256(path: str | Path) -> str:
    """SHA-256 of a file's contents after gunzip (raises OSError, EOFError or zlib.error if unreadable)."""
    digest = hashlib.sha256()
    with gzip.open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, sha256: str, title: str = "dataset") -> Path:
    """Download `url` to `dest`, verifying the content checksum before the file appears under its name.

    The bytes go to a uniquely named temp file in the same folder and are renamed with `os.replace`
    only after the checksum passes, so an interrupted or corrupt download never looks like a cached
    file, and several processes (e.g. torchrun ranks) downloading at once cannot clobber each other.
    """
    dest = Path(dest)
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=folder)
    except OSError as err:
        raise NoisecraftError(
            f"Cannot write to the data folder {folder} ({err.strerror or err}); "
            "pass a writable --data-dir or set NOISECRAFT_DATA."
        ) from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                total = response.headers.get("Content-Length")
                with tqdm(
                    total=int(total) if total and total.isdigit() else None, unit="B",
                    unit_scale=True, unit_divisor=1024, desc=dest.name, leave=False,
                ) as bar:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        out.write(block)
                        bar.update(len(block))
        except (OSError, http.client.HTTPException, ValueError) as err:
            if isinstance(err, urllib.error.HTTPError):
                reason = f"HTTP {err.code} {err.reason}"
            else:
                reason = getattr(err, "reason", None) or err
            raise NoisecraftError(
                f"Could not download {url} ({reason}); place the {title} files manually in "
                f"{folder} or pass --data-dir pointing at a folder that holds them."
            ) from None

        try:
            got = content_sha256(tmp)
        except (OSError, EOFError, zlib.error) as err:
            got = f"unreadable gzip data ({err})"
        if got != sha256:
            raise NoisecraftError(
                f"Downloaded {title} file {dest.name} from {url} failed its checksum "
                f"(expected content SHA-256 {sha256}, got {got}); the mirror or the connection "
                f"is corrupting it, so run again later or place a good copy in {folder}."
            )
        os.replace(tmp, dest)
        return dest
    finally:
        # On success the temp name no longer exists; on any failure this removes the partial file.
        tmp.unlink(missing_ok=True)


def ensure_files(
    name: str, data_dir: Path, *, download: bool = True, base_url: str | None = None,
    files: list[str] | None = None,
) -> Path:
    """Make sure the IDX files of dataset `name` exist in `<data_dir>/<folder>/`; return that folder.

    Missing files are downloaded from `base_url` (default: the `NOISECRAFT_*_URL` environment
    variable, else the module constant) when `download` is true. Files already present are used as
    they are: they are parsed and size-checked on load, not re-hashed, so a second call is instant.
    """
    source = SOURCES[name]
    folder = Path(data_dir) / source.folder
    wanted = files if files is not None else list(source.files)
    missing = [f for f in wanted if not (folder / f).is_file()]
    if not missing:
        return folder
    if not download:
        raise NoisecraftError(
            f"{source.title} files are missing from {folder} (expected {', '.join(missing)}); "
            "place them there, pass --data-dir pointing at a folder with a "
            f"'{source.folder}' sub-folder, or allow downloading."
        )
    base = source.base_url(base_url).rstrip("/") + "/"
    for file_name in missing:
        download_file(base + file_name, folder / file_name, source.files[file_name], source.title)
    return folder
