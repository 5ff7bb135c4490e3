"""Captions for text-conditional training: class templates for MNIST-style sets, caption files for folders.

A dataset's captions are held as a small table of unique strings plus, for each example, the indices
of the captions it may be shown with. Text encoders are frozen, so a trainer can embed the unique
strings once and turn a batch of caption indices into embeddings by indexing.

Several captions per class ("a handwritten digit seven", "the number 7", ...) make the model follow the
meaning of a prompt rather than one fixed string.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NoisecraftError
from .datasets import IMAGE_EXTENSIONS

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# {word}: "seven", {digit}: "7". The first template gives the canonical prompt of `class_prompt`.
DIGIT_TEMPLATES = [
    "a handwritten digit {word}",
    "the number {digit}",
    "a picture of the digit {digit}",
    "a hand-drawn {word}",
    "the digit {word}",
    "a handwritten number {digit}",
    "a drawing of the number {word}",
    "a white {digit} on a black background",
]

# Natural names for Fashion-MNIST's classes, the first one canonical, with their article.
FASHION_NAMES = [
    ["a t-shirt", "a top"],
    ["a pair of trousers", "a pair of pants"],
    ["a pullover", "a sweater"],
    ["a dress"],
    ["a coat"],
    ["a sandal"],
    ["a shirt"],
    ["a sneaker", "a running shoe"],
    ["a bag", "a handbag"],
    ["an ankle boot", "a boot"],
]
# {item}: "a sneaker", "an ankle boot", "a pair of trousers".
FASHION_TEMPLATES = [
    "a photo of {item}",
    "{item}",
    "a picture of {item}",
    "a product photo of {item}",
    "a black and white photo of {item}",
    "a small photo of {item}",
]

# CIFAR-10's classes with their article, the first name canonical ("cifar10" and the "cifar10-jpeg" copy).
CIFAR10_NAMES = [
    ["an airplane", "a plane", "an aeroplane"],
    ["a car", "an automobile"],
    ["a bird"],
    ["a cat"],
    ["a deer"],
    ["a dog"],
    ["a frog"],
    ["a horse"],
    ["a ship", "a boat"],
    ["a truck", "a lorry"],
]
# {item}: "a cat", "an airplane".
CIFAR10_TEMPLATES = [
    "a photo of {item}",
    "{item}",
    "a small photo of {item}",
    "a blurry photo of {item}",
    "a low resolution photo of {item}",
    "a picture of {item}",
]

CAPTION_FILES = ("captions.jsonl", "captions.csv")


@dataclass
class Captions:
    """Unique caption strings, and for each of N examples the K indices into them it may get.

    Rows with fewer than K captions are padded by repeating their own captions; `counts` (N,) keeps how
    many are real so that sampling stays uniform over them (None: all K are real).
    """

    texts: list[str]
    choices: torch.LongTensor
    counts: torch.LongTensor | None = None

    def __post_init__(self) -> None:
        if self.choices.ndim != 2 or self.choices.dtype != torch.long:
            raise ValueError(f"choices must be an int64 N×K tensor, got {self.choices.dtype} {tuple(self.choices.shape)}")
        if self.counts is not None and self.counts.shape != self.choices.shape[:1]:
            raise ValueError(f"counts must have shape ({len(self.choices)},), got {tuple(self.counts.shape)}")

    def __len__(self) -> int:
        return int(self.choices.shape[0])

    def sample(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.LongTensor:
        """One text index per example in `indices`, uniform over that example's captions."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        rows = self.choices[idx]
        counts = self.counts[idx] if self.counts is not None else torch.full((len(idx),), rows.shape[1])
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(len(idx), generator=generator, device=device).cpu()
        pick = (u * counts).long().clamp_(max=rows.shape[1] - 1)  # clamp: float rounding at u -> 1
        return rows.gather(1, pick.unsqueeze(1)).squeeze(1)

    def prompts(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
        """The sampled caption strings themselves."""
        return [self.texts[i] for i in self.sample(indices, generator).tolist()]


def _dataset_key(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key in ("cifar-10", "cifar10-jpeg", "cifar-10-jpeg"):
        return "cifar10"
    return "digits" if key == "mnist" else key


def class_captions(dataset_name: str) -> list[list[str]]:
    """All captions of each class of a built-in dataset ("mnist", "digits", "fashion-mnist", "cifar10")."""
    key = _dataset_key(dataset_name)
    if key == "digits":
        return [[t.format(word=w, digit=d) for t in DIGIT_TEMPLATES] for d, w in enumerate(DIGIT_WORDS)]
    if key == "fashion-mnist":
        return [[t.format(item=n) for n in names for t in FASHION_TEMPLATES] for names in FASHION_NAMES]
    if key == "cifar10":
        return [[t.format(item=n) for n in names for t in CIFAR10_TEMPLATES] for names in CIFAR10_NAMES]
    raise NoisecraftError(f"dataset {dataset_name!r} has no built-in class captions; use mnist, digits, "
                          "fashion-mnist or cifar10, or a folder:PATH dataset with a captions.jsonl or captions.csv "
                          "file.")


def class_prompts(dataset_name: str) -> list[str]:
    """The canonical prompt of each class, e.g. "a handwritten digit seven", "a photo of a sneaker"."""
    return [captions[0] for captions in class_captions(dataset_name)]


def class_prompt(dataset_name: str, class_index: int) -> str:
    prompts = class_prompts(dataset_name)
    if not isinstance(class_index, int) or not 0 <= class_index < len(prompts):
        raise NoisecraftError(f"class {class_index!r} does not exist in {dataset_name}; use 0..{len(prompts) - 1}.")
    return prompts[class_index]


def _table(per_example: list[list[str]]) -> Captions:
    """Unique texts (first-seen order) and an N×K choice table padded by repeating each row."""
    position: dict[str, int] = {}
    rows = [[position.setdefault(t, len(position)) for t in captions] for captions in per_example]
    k = max((len(r) for r in rows), default=1)
    choices = torch.tensor([[r[j % len(r)] for j in range(k)] for r in rows], dtype=torch.long).reshape(-1, k)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return Captions(list(position), choices, None if bool((counts == k).all()) else counts)


def captions_for(dataset) -> Captions:
    """Captions of every example of an `ImageDataset`: class templates for mnist/digits/fashion-mnist/cifar10,
    or the captions.jsonl / captions.csv file of a folder:PATH dataset."""
    name = dataset.name
    if name.startswith("folder:"):
        return _folder_captions(dataset)
    per_class = class_captions(name)
    if dataset.labels is None:
        raise NoisecraftError(f"dataset {name!r} has no labels to caption; load it with load_dataset.")
    table = _table(per_class)  # one row per class, then one per example by indexing the labels
    return Captions(table.texts, table.choices[dataset.labels.cpu()],
                    table.counts[dataset.labels.cpu()] if table.counts is not None else None)


# --------------------------------------------------------------------------------------------------
# Folder caption files


def _clean_file_name(text: str) -> str:
    parts = [p for p in text.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def _read_jsonl(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise NoisecraftError(f"{path} line {number} is not valid JSON ({e.msg}); write one object per line "
                                  'like {"file": "cat1.png", "caption": "a cat"}.') from None
        if not (isinstance(item, dict) and isinstance(item.get("file"), str) and isinstance(item.get("caption"), str)
                and item["file"].strip()):
            raise NoisecraftError(f'{path} line {number} needs string fields "file" and "caption"; write it '
                                  'like {"file": "cat1.png", "caption": "a cat"}.')
        rows.append((number, item["file"], item["caption"]))
    return rows


def _read_csv(path: Path) -> list[tuple[int, str, str]]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != ["file", "caption"]:
        raise NoisecraftError(f"{path} line 1 must be the header file,caption (got {header!r}); add it.")
    rows = []
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip():
            raise NoisecraftError(f"{path} line {number} has {len(row)} field(s) instead of file,caption; quote "
                                  'captions that contain commas, like cat1.png,"a cat, asleep".')
        rows.append((number, row[0], row[1]))
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often prepend a byte-order mark
    except UnicodeDecodeError as e:
        raise NoisecraftError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8.") from None


def _folder_captions(dataset) -> Captions:
    root = Path(dataset.name[len("folder:"):]).expanduser()
    found = [root / f for f in CAPTION_FILES if (root / f).is_file()]
    if not found:
        raise NoisecraftError(f"image folder {root} has no captions file; add captions.jsonl (lines like "
                              '{"file": "cat1.png", "caption": "a cat"}) or captions.csv (header file,caption).')
    if len(found) > 1:
        raise NoisecraftError(f"image folder {root} holds both captions.jsonl and captions.csv; keep only one.")
    if dataset.files is None:
        raise NoisecraftError(f"dataset {dataset.name!r} does not know its image files; load it with load_dataset.")
    path = found[0]
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)

    by_file: dict[str, list[str]] = {f: [] for f in dataset.files}
    for number, file, caption in rows:
        key = _clean_file_name(file)
        if key in by_file:
            by_file[key].append(caption)
        elif not ((root / key).is_file() and (root / key).suffix.lower() in IMAGE_EXTENSIONS):
            # Images of the folder outside a subset are fine; names of no image at all are not.
            raise NoisecraftError(f"{path} line {number} names {file!r}, which is not an image in {root}; "
                                  "fix the name (relative to the folder) or remove the line.")
    missing = [f for f, captions in by_file.items() if not captions]
    if missing:
        raise NoisecraftError(f"{len(missing)} image(s) in {root} have no caption in {path.name} (e.g. {missing[0]}); "
                              "add a line for each image or remove the image.")
    # A repeated (file, caption) line is kept once, so it does not double that caption's chance.
    return _table([list(dict.fromkeys(by_file[f])) for f in dataset.files])
