"""Generation parameters in PNG text chunks (io/png_params.py): the A1111 `parameters` string, our JSON chunk, the
round trip, parsing other tools' strings, and hostile chunks refused in one sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_guidance import write_run

from noisecraft.errors import NoisecraftError
from noisecraft.io.png_params import (
    JSON_KEY,
    PARAMETERS_KEY,
    image_seed,
    parse_parameters_text,
    png_parameters_text,
    read_png_params,
    write_png,
)

PARAMS = dict(model="/runs/ldm", job="txt2img", sampler="DPM++ 2M Karras", steps=30, guidance=7.5, spacing="leading",
              eta=0.0, seed=1234, index=3, prompt="a cat, sitting: on a mat", negative_prompt="blurry", label=None,
              negative_label=None, height=32, width=48, strength=None)

A1111 = ("masterpiece, best quality, a photo of an astronaut riding a horse on mars\n"
         "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
         "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3407, Size: 512x768, Model hash: 6ce0161689, "
         "Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
         'Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", Version: v1.6.0')


def _rgb(h=32, w=48):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_parameters_text_has_the_a1111_layout():
    text = png_parameters_text(PARAMS)
    lines = text.split("\n")
    assert lines[0] == "a cat, sitting: on a mat"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1237, Size: 48x32, "
                               "Model: ldm, ")
    assert len(lines) == 3


def test_round_trip_keeps_every_setting_and_the_pixels(tmp_path):
    image = _rgb()
    path = write_png(tmp_path / "out" / "a.png", image, PARAMS)
    back = read_png_params(path)
    assert back["source"] == JSON_KEY
    for key, value in PARAMS.items():
        assert back.get(key) == value, key
    assert image_seed(back) == 1237
    assert back["version"]
    assert np.array_equal(np.asarray(Image.open(path)), image)
    # the A1111 chunk says the same in its own words
    parsed = parse_parameters_text(Image.open(path).text[PARAMETERS_KEY])
    assert parsed["prompt"] == PARAMS["prompt"] and parsed["negative_prompt"] == "blurry"
    assert (parsed["steps"], parsed["sampler"], parsed["guidance"], parsed["seed"]) == (30, "DPM++ 2M Karras", 7.5, 1237)
    assert (parsed["width"], parsed["height"], parsed["model"]) == (48, 32, "ldm")


def test_grey_image_and_unicode_prompt(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    path = write_png(tmp_path / "g.png", grey, dict(prompt="ein Hund — 犬", seed=0, index=0, label=7))
    back = read_png_params(path)
    assert back["prompt"] == "ein Hund — 犬" and back["label"] == 7
    assert np.array_equal(np.asarray(Image.open(path)), grey[..., 0])


def test_a1111_string_is_parsed():
    p = parse_parameters_text(A1111)
    assert p["prompt"] == "masterpiece, best quality, a photo of an astronaut riding a horse on mars"
    assert p["negative_prompt"] == "lowres, bad anatomy, (worst quality:1.4)"
    assert (p["steps"], p["sampler"], p["guidance"], p["seed"]) == (20, "DPM++ 2M Karras", 7.0, 3407)
    assert (p["width"], p["height"], p["model"], p["strength"]) == (512, 768, "v1-5-pruned-emaonly", 0.7)
    assert p["extra"]["Clip skip"] == "2"
    assert p["extra"]["Lora hashes"] == "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"


def test_a1111_png_without_our_chunk_falls_back_to_the_string(tmp_path):
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, "a dog\nSteps: 12, Sampler: Euler a, CFG scale: 5, Seed: 9, Size: 64x64, "
                                  "Schedule type: Karras")
    path = tmp_path / "a1111.png"
    Image.fromarray(_rgb(8, 8)).save(path, pnginfo=info)
    p = read_png_params(path)
    assert p["source"] == PARAMETERS_KEY
    assert (p["prompt"], p["steps"], p["sampler"], p["guidance"], p["seed"], p["karras"]) == \
        ("a dog", 12, "Euler a", 5.0, 9, True)


def test_a1111_string_without_prompt_or_settings():
    assert parse_parameters_text("Steps: 5, Seed: 2").get("prompt") is None
    p = parse_parameters_text("just a prompt\non two lines")
    assert p["prompt"] == "just a prompt\non two lines" and "steps" not in p


def _png_with(tmp_path, key, text, name="bad.png"):
    info = PngInfo()
    info.add_itxt(key, text)
    path = tmp_path / name
    Image.fromarray(_rgb(4, 4)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("text", [
    "{not json", "[1, 2, 3]", '{"steps": "many"}', '{"seed": 1.5}', '{"guidance": NaN}', '{"karras": 1}',
    "[" * 100000, "[" * 30000 + "]" * 30000, json.dumps({"prompt": "x" * 200000}),
    json.dumps({"prompt": "x" * 3_000_000}),
])
def test_hostile_or_corrupt_json_chunk_is_refused_in_one_sentence(tmp_path, text):
    path = _png_with(tmp_path, JSON_KEY, text)
    with pytest.raises(NoisecraftError) as e:
        read_png_params(path)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300 and str(path) in message


def test_png_without_parameters_and_non_png_files(tmp_path):
    plain = tmp_path / "plain.png"
    Image.fromarray(_rgb(4, 4)).save(plain)
    with pytest.raises(NoisecraftError, match="carries no generation parameters"):
        read_png_params(plain)
    with pytest.raises(NoisecraftError, match="does not exist"):
        read_png_params(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(NoisecraftError, match="cannot read the PNG"):
        read_png_params(junk)
    jpeg = tmp_path / "a.jpg"
    Image.fromarray(_rgb(4, 4)).save(jpeg)
    with pytest.raises(NoisecraftError, match="PNGs only"):
        read_png_params(jpeg)


def test_unknown_fields_are_dropped_and_bad_images_refused(tmp_path):
    path = _png_with(tmp_path, JSON_KEY, json.dumps({"seed": 3, "future_setting": [1, 2]}))
    assert read_png_params(path) == {"seed": 3, "source": JSON_KEY}
    with pytest.raises(NoisecraftError, match="uint8"):
        write_png(tmp_path / "f.png", np.zeros((4, 4, 3), np.float32), {})
    with pytest.raises(NoisecraftError, match="H×W×C"):
        write_png(tmp_path / "f.png", np.zeros((4, 4, 2), np.uint8), {})


# ---------------------------------------------------------------- the command line: --png-dir and --from-png


def _npz(path):
    return np.load(path)["images"]


def test_png_dir_then_from_png_reproduces_the_identical_image(tmp_path, capsys):
    from noisecraft.cli import main
    run = write_run(tmp_path / "run", num_classes=10)
    pngs = tmp_path / "pngs"
    assert main(["sample", str(run), "--n", "3", "--seed", "5", "--label", "4", "--sampler", "ddim", "--steps", "4",
                 "--eta", "0.5", "--png-dir", str(pngs), "--out", str(tmp_path / "all.npz"),
                 "--grid", str(tmp_path / "grid.png")]) == 0
    assert sorted(p.name for p in pngs.iterdir()) == ["00000-5.png", "00001-6.png", "00002-7.png"]
    assert PARAMETERS_KEY not in Image.open(tmp_path / "grid.png").info       # grids stay without parameters
    params = read_png_params(pngs / "00002-7.png")
    assert (params["model"], params["sampler"], params["steps"], params["eta"], params["seed"], params["index"],
            params["label"], params["height"], params["width"]) == (str(run.resolve()), "ddim", 4, 0.5, 5, 2, 4, 16, 16)
    batch = _npz(tmp_path / "all.npz")

    assert main(["sample", "--from-png", str(pngs / "00002-7.png"), "--out", str(tmp_path / "one.npz")]) == 0
    one = _npz(tmp_path / "one.npz")
    assert one.shape == (1, 16, 16, 1)
    assert np.array_equal(one[0], batch[2])
    assert np.array_equal(one[0, ..., 0], np.asarray(Image.open(pngs / "00002-7.png")))

    # flags given explicitly override the picture's settings; --n draws the next seeds
    assert main(["sample", "--from-png", str(pngs / "00001-6.png"), "--n", "2", "--out", str(tmp_path / "two.npz")]) == 0
    assert np.array_equal(_npz(tmp_path / "two.npz"), batch[1:3])
    assert main(["sample", "--from-png", str(pngs / "00001-6.png"), "--seed", "5", "--png-dir", str(tmp_path / "again"),
                 "--steps", "4"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "00000-5.png")), batch[0, ..., 0])
    assert main(["sample", "--from-png", str(pngs / "00001-6.png"), "--label", "3", "--out", str(tmp_path / "l.npz")]) == 0
    assert not np.array_equal(_npz(tmp_path / "l.npz")[0], batch[1])


def test_from_png_errors_are_one_line(tmp_path, capsys):
    from noisecraft.cli import main
    orphan = write_png(tmp_path / "orphan.png", _rgb(16, 16), dict(model=str(tmp_path / "gone"), job="sample", seed=1))
    assert main(["sample", "--from-png", str(orphan), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not here; give it as RUN or --model" in err and "\n" not in err
    edited = write_png(tmp_path / "edit.png", _rgb(16, 16), dict(model=str(tmp_path), job="img2img", seed=1))
    assert main(["sample", "--from-png", str(edited), "--out", str(tmp_path / "x.npz")]) == 2
    assert "img2img" in capsys.readouterr().err
    assert main(["sample", "--from-png", str(tmp_path / "nothing.png"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_txt2img_png_reproduces_a_text_to_image_picture(tmp_path):
    """Prompt, negative prompt, an A1111 sampler name, size and guidance travel with the picture (tiny SD folder)."""
    pytest.importorskip("diffusers")
    from tiny_sd import save_tiny_pipeline

    from noisecraft.cli import main
    save_tiny_pipeline(tmp_path / "sd")
    pngs = tmp_path / "pngs"
    assert main(["txt2img", "--model", str(tmp_path / "sd"), "a cat, on a mat", "--negative-prompt", "a dog",
                 "--sampler", "DPM++ 2M Karras", "--steps", "3", "--n", "2", "--seed", "11", "--height", "32",
                 "--width", "48", "--png-dir", str(pngs), "--out", str(tmp_path / "all.npz")]) == 0
    png = pngs / "00001-12.png"
    text = Image.open(png).text[PARAMETERS_KEY]
    assert text.startswith("a cat, on a mat\nNegative prompt: a dog\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.5, "
                           "Seed: 12, Size: 48x32, Model: sd, ")
    params = read_png_params(png)
    assert (params["job"], params["n"], params["batch_size"], params["index"]) == ("txt2img", 2, 2, 1)
    # its batch is drawn again and only this picture kept: bit for bit the same (batched kernels round differently
    # for other batch sizes), and the PNG written from it describes it the same way
    assert main(["sample", "--from-png", str(png), "--out", str(tmp_path / "one.npz"),
                 "--png-dir", str(tmp_path / "again")]) == 0
    assert np.array_equal(_npz(tmp_path / "one.npz")[0], _npz(tmp_path / "all.npz")[1])
    again = tmp_path / "again" / "00001-12.png"
    assert np.array_equal(np.asarray(Image.open(again)), _npz(tmp_path / "all.npz")[1])
    assert {k: v for k, v in read_png_params(again).items() if k != "model"} == \
        {k: v for k, v in params.items() if k != "model"}
