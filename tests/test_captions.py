"""Captions: class templates, uniform deterministic sampling, folder caption files and their errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.data.captions import (
    DIGIT_TEMPLATES,
    FASHION_TEMPLATES,
    Captions,
    captions_for,
    class_captions,
    class_prompt,
    class_prompts,
)
from noisecraft.data.datasets import DIGIT_CLASSES, FASHION_CLASSES, ImageDataset, load_dataset
from noisecraft.errors import NoisecraftError


def _fake(name, labels):
    labels = torch.tensor(labels, dtype=torch.long)
    return ImageDataset(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels, [], name)


def test_templates_cover_every_class():
    digits, fashion = class_captions("mnist"), class_captions("fashion-mnist")
    assert len(digits) == len(DIGIT_CLASSES) and len(fashion) == len(FASHION_CLASSES)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for d, captions in enumerate(digits):
        assert len(set(captions)) == len(DIGIT_TEMPLATES) >= 4
        assert all(str(d) in c or words[d] in c for c in captions)
    for captions in fashion:
        assert len(set(captions)) >= len(FASHION_TEMPLATES) >= 4
    assert len({c for captions in digits + fashion for c in captions}) == sum(map(len, digits + fashion))
    assert class_prompt("mnist", 7) == "a handwritten digit seven"
    assert class_prompt("digits", 7) == class_prompt("MNIST", 7)
    assert class_prompts("fashion-mnist")[7] == "a photo of a sneaker"
    assert class_prompts("fashion_mnist")[9] == "a photo of an ankle boot"
    assert "a photo of a pair of trousers" in fashion[1] and "a photo of a t-shirt" in fashion[0]
    with pytest.raises(NoisecraftError, match="no built-in class captions"):
        class_prompts("cifar-100")
    with pytest.raises(NoisecraftError, match="does not exist"):
        class_prompt("mnist", 10)


def test_class_dataset_captions_and_sampling():
    data = _fake("mnist", [7, 0, 7, 3])
    caps = captions_for(data)
    assert caps.choices.shape == (4, len(DIGIT_TEMPLATES))
    assert torch.equal(caps.choices[0], caps.choices[2])
    picks = caps.sample(torch.tensor([0, 1, 3] * 200), torch.Generator().manual_seed(1))
    texts = [caps.texts[i] for i in picks.tolist()]
    assert all(("7" in t or "seven" in t) for t in texts[0::3])
    assert all(("3" in t or "three" in t) for t in texts[2::3])
    assert len(set(texts[0::3])) == len(DIGIT_TEMPLATES)  # every template gets used
    again = caps.sample(torch.tensor([0, 1, 3] * 200), torch.Generator().manual_seed(1))
    other = caps.sample(torch.tensor([0, 1, 3] * 200), torch.Generator().manual_seed(2))
    assert torch.equal(picks, again) and not torch.equal(picks, other)
    real = load_dataset("digits")
    assert len(captions_for(real)) == len(real)
    with pytest.raises(NoisecraftError, match="no built-in class captions"):
        captions_for(_fake("cifar-100", [0]))


def test_sampling_is_uniform_over_real_choices():
    # Row 0 has three captions, row 1 one; padding by repetition must not bias row 0 towards text 0.
    caps = Captions(["a", "b", "c", "d"], torch.tensor([[0, 1, 2], [3, 3, 3]]), torch.tensor([3, 1]))
    picks = caps.sample(torch.zeros(3000, dtype=torch.long), torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=4)
    assert counts[3] == 0 and (counts[:3] > 900).all()
    assert (caps.sample(torch.ones(50, dtype=torch.long), torch.Generator().manual_seed(0)) == 3).all()
    fashion = captions_for(_fake("fashion-mnist", [3, 7]))  # dress: fewer names than sneaker
    assert fashion.counts is not None and fashion.counts[0] < fashion.counts[1]
    dress = fashion.prompts(torch.zeros(400, dtype=torch.long), torch.Generator().manual_seed(0))
    assert set(dress) == set(class_captions("fashion-mnist")[3])


def _image_folder(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8), "L").save(root / name)
    return root


def test_folder_jsonl(tmp_path):
    root = _image_folder(tmp_path / "imgs", ["cat1.png", "cat2.png", "dog.png"])
    lines = [{"file": "cat1.png", "caption": "a cat"}, {"file": "./cat2.png", "caption": "a grey cat"},
             {"file": "dog.png", "caption": "a dog"}, {"file": "dog.png", "caption": "a good dog"},
             {"file": "cat1.png", "caption": "a cat"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = load_dataset(f"folder:{root}")
    assert data.files == ["cat1.png", "cat2.png", "dog.png"]
    assert data.subset(2).files == ["cat1.png", "cat2.png"]
    caps = captions_for(data)
    assert caps.texts == ["a cat", "a grey cat", "a dog", "a good dog"]
    assert caps.choices.shape == (3, 2) and caps.counts.tolist() == [1, 1, 2]  # the repeated line counts once
    picks = caps.prompts(torch.tensor([0, 1, 2] * 100), torch.Generator().manual_seed(0))
    assert set(picks[0::3]) == {"a cat"} and set(picks[1::3]) == {"a grey cat"}
    assert set(picks[2::3]) == {"a dog", "a good dog"}
    # A subset keeps captions of its own images and accepts lines naming the others.
    assert captions_for(data.subset(2)).choices.shape[0] == 2


def test_folder_csv_with_class_subfolders(tmp_path):
    root = _image_folder(tmp_path / "imgs", ["cats/a.png", "dogs/b.png"])
    (root / "captions.csv").write_text('file,caption\ncats/a.png,"a cat, asleep"\ndogs/b.png,a dog\n')
    data = load_dataset(f"folder:{root}")
    assert data.files == ["cats/a.png", "dogs/b.png"]
    caps = captions_for(data)
    assert [caps.texts[i] for i in caps.choices[:, 0].tolist()] == ["a cat, asleep", "a dog"]


@pytest.mark.parametrize("name, text, message", [
    ("captions.jsonl", '{"file": "a.png", "caption": "x"}\n{"file": "b.png", "caption": "y"}\n'
                       '{"file": "c.png", "caption": "z"}\n', "line 3 names 'c.png'"),
    ("captions.jsonl", '{"file": "a.png", "caption": "x"}\n', r"1 image\(s\) .* \(e.g. b.png\)"),
    ("captions.jsonl", '{"file": "a.png", "caption": "x"}\n{"file": "b.png", "caption": "y"\n', "line 2 is not valid JSON"),
    ("captions.jsonl", '{"file": "a.png", "caption": "x"}\n["b.png", "y"]\n', 'line 2 needs string fields'),
    ("captions.csv", "file,caption\na.png,x\nb.png,y,z\n", "line 3 has 3 field"),
    ("captions.csv", "image,text\na.png,x\nb.png,y\n", "header file,caption"),
    ("captions.csv", "file,caption\na.png,x\nnotes.txt,y\n", "line 3 names 'notes.txt'"),
])
def test_folder_caption_errors(tmp_path, name, text, message):
    root = _image_folder(tmp_path / "imgs", ["a.png", "b.png"])
    (root / "notes.txt").write_text("not an image")
    (root / name).write_text(text)
    data = load_dataset(f"folder:{root}")
    with pytest.raises(NoisecraftError, match=message):
        captions_for(data)


def test_folder_without_or_with_two_caption_files(tmp_path):
    root = _image_folder(tmp_path / "imgs", ["a.png"])
    data = load_dataset(f"folder:{root}")
    with pytest.raises(NoisecraftError, match="has no captions file"):
        captions_for(data)
    (root / "captions.jsonl").write_text('{"file": "a.png", "caption": "x"}\n')
    (root / "captions.csv").write_text("file,caption\na.png,x\n")
    with pytest.raises(NoisecraftError, match="keep only one"):
        captions_for(data)
