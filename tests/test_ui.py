"""`noisecraft ui` through its HTTP API: a real server on 127.0.0.1 (a free port, a background thread) driven by
gradio_client, on tiny models written by the test (a class-conditional pixel run and a tiny Stable Diffusion folder):
generate with a live preview, cancel within a step, PNG parameters, img2img and inpainting with a painted mask, two
clients at once through the queue, path confinement and hostile model files, and the command line's refusals."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from test_guidance import write_run

from noisecraft.cli import main
from noisecraft.commands.ui import check_host, create, launch, parse_auth
from noisecraft.errors import NoisecraftError
from noisecraft.ui.engine import Engine, Job
from noisecraft.ui.library import ModelLibrary


class RunsCode:
    """Unpickling this calls fn(*args): a hostile .ckpt (as in test_fault_tolerance.py)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ui")
    root = base / "models"
    paths = {"root": root, "base": base, "digits": write_run(root / "digits", num_classes=10),
             "outside": write_run(base / "secret" / "run")}
    try:
        from tiny_sd import save_tiny_pipeline
        save_tiny_pipeline(root / "sd")
        paths["sd"] = root / "sd"
    except ImportError:          # diffusers missing: the SD-shaped checks skip
        pass
    paths["marker"] = base / "pwned"
    evil = root / "evil.ckpt"
    evil.write_bytes(pickle.dumps(RunsCode(os.system, (f"touch {paths['marker']}",)), protocol=2))
    paths["evil"] = evil
    weights = (paths["digits"] / "model.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(weights[: len(weights) // 2])
    paths["truncated"] = root / "truncated.safetensors"
    (root / "link").symlink_to(base / "secret" / "run")
    paths["link"] = root / "link"
    return paths


@pytest.fixture(scope="module")
def server(models):
    outputs = models["base"] / "outputs"
    demo, _ = create([str(models["root"])], outputs=outputs, announce=False)
    port = free_port()
    launch(demo, port=port, outputs=outputs, block=False)
    url = f"http://127.0.0.1:{port}/"
    yield {"url": url, "outputs": outputs, "demo": demo}
    demo.close()


@pytest.fixture()
def client(server):
    return gradio_client.Client(server["url"], verbose=False)


def settings(model, label="none", sampler="ddim", steps=8, seed=5, batch=1, prompt="", negative="", guidance=None,
             eta=None, height=None, width=None, preview_every=2, prompt_b="", mix=0.0):
    """The inputs of /generate in order (model, prompt, negative prompt, label, negative label, sampler, steps,
    guidance, η, seed, batch size, height, width, preview every, second prompt, its weight)."""
    return [str(model), prompt, negative, label, "none", sampler, steps, guidance, eta, seed, batch, height, width,
            preview_every, prompt_b, mix]


def status_of(result) -> str:
    return result[1]


def test_generate_writes_pngs_with_parameters_and_the_same_seed_repeats(client, models, server):
    from noisecraft.io.png_params import read_png_params

    result = client.predict(*settings(models["digits"], label="3", batch=2), api_name="/generate")
    assert status_of(result).startswith("✓ done: 2 image(s), seed 5"), result
    gallery = result[2]
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    assert all(Image.open(item["image"]).size[0] <= 160 for item in gallery)      # thumbnails, not full images
    saved = sorted(server["outputs"].glob("*.png"))[-2:]
    params = read_png_params(saved[0])
    assert params["sampler"] == "ddim" and params["steps"] == 8 and params["seed"] == 5 and params["label"] == 3
    first = np.asarray(Image.open(saved[0]))
    again = client.predict(*settings(models["digits"], label="3", batch=1), api_name="/generate")
    assert status_of(again).startswith("✓")
    newest = max(server["outputs"].glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(newest)), first)                   # same settings, same picture


def test_preview_arrives_while_it_runs_and_cancel_stops_it(client, models):
    job = client.submit(*settings(models["digits"], sampler="ddpm", steps=1000, preview_every=1),
                        api_name="/generate")
    deadline = time.time() + 60
    while time.time() < deadline and not any(isinstance(o[0], str) for o in job.outputs()):
        time.sleep(0.05)
    previews = [o[0] for o in job.outputs() if isinstance(o[0], str)]
    assert previews and Path(previews[0]).is_file()                  # the decoded x̂0, before the run ends
    assert "cancelling" in client.predict(api_name="/cancel")
    start = time.time()
    result = job.result(timeout=30)
    assert time.time() - start < 5
    assert "cancelled after step" in status_of(result)
    step = int(status_of(result).split("after step ")[1].split()[0])
    assert step < 1000


def test_cancel_stops_within_one_step():
    """The engine's flag is checked in the sampler callback: no step runs once Cancel is seen."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        run = write_run(Path(folder) / "m" / "run")
        engine = Engine(ModelLibrary([Path(folder) / "m"]), Path(folder) / "out")
        seen = []
        for event in engine.run(Job(model=str(run), sampler="euler", steps=200, seed=0, preview_every=0)):
            if event[0] == "progress":
                seen.append(event[1])
                if len(seen) == 1:
                    engine.cancel()                 # after the first step shown (progress is throttled by time)
        assert event[0] == "cancelled"
        assert event[1] <= seen[0] + 1 and seen[-1] <= seen[0] + 1


def test_previews_and_progress_are_throttled_by_wall_time():
    """A preview every k steps of a fast sampler would cost more than the sampling (the overhead benchmark): the
    first comes after step 1, then at most one per PREVIEW_MIN_S seconds; progress at most one per PROGRESS_MIN_S
    and always the last step. The PNG still carries its parameters."""
    import tempfile

    from noisecraft.io.png_params import read_png_params
    from noisecraft.ui.engine import PREVIEW_MIN_S, PROGRESS_MIN_S
    with tempfile.TemporaryDirectory() as folder:
        run = write_run(Path(folder) / "m" / "run")
        engine = Engine(ModelLibrary([Path(folder) / "m"]), Path(folder) / "out")
        start, kinds, progress = time.monotonic(), [], []
        for event in engine.run(Job(model=str(run), sampler="euler", steps=300, seed=0, preview_every=1)):
            kinds.append(event[0])
            if event[0] == "progress":
                progress.append(event[1])
        elapsed = time.monotonic() - start
        assert kinds[-1] == "done" and kinds[0] == "progress" and "preview" in kinds[:3]
        assert 1 <= kinds.count("preview") <= elapsed / PREVIEW_MIN_S + 2
        assert progress[0] == 1 and progress[-1] == 300 and len(progress) <= elapsed / PROGRESS_MIN_S + 3
        item = event[1][0]
        assert read_png_params(item.image)["steps"] == 300 and item.thumb.is_file()


def test_a_cancel_from_another_session_does_not_stop_my_run(server, models):
    a = gradio_client.Client(server["url"], verbose=False)
    b = gradio_client.Client(server["url"], verbose=False)
    job = a.submit(*settings(models["digits"], steps=40), api_name="/generate")
    time.sleep(0.5)
    assert "nothing of yours" in b.predict(api_name="/cancel")
    assert status_of(job.result(timeout=60)).startswith("✓")


def test_two_clients_wait_in_the_queue_and_both_finish(server, models, monkeypatch):
    running, overlap = [0], [0]
    lock = threading.Lock()
    original = Engine._run

    def counted(self, job):
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        try:
            yield from original(self, job)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Engine, "_run", counted)
    a = gradio_client.Client(server["url"], verbose=False)
    b = gradio_client.Client(server["url"], verbose=False)
    jobs = [c.submit(*settings(models["digits"], steps=60, seed=s), api_name="/generate") for c, s in ((a, 1), (b, 2))]
    results = [j.result() for j in jobs]
    assert all(status_of(r).startswith("✓") for r in results), results
    assert overlap[0] == 1                                   # one generation at a time


def test_img2img_and_inpaint_with_a_painted_mask(client, models, tmp_path):
    from gradio_client import handle_file
    picture = np.zeros((16, 16, 3), np.uint8)
    picture[4:12, 6:10] = 255
    Image.fromarray(picture).save(tmp_path / "in.png")
    layer = np.zeros((16, 16, 4), np.uint8)
    layer[:, 8:] = (255, 255, 255, 255)                      # paint the right half
    Image.fromarray(layer).save(tmp_path / "mask.png")
    editor = {"background": handle_file(tmp_path / "in.png"), "layers": [handle_file(tmp_path / "mask.png")],
              "composite": handle_file(tmp_path / "in.png")}
    out = client.predict(*settings(models["digits"], steps=10), editor, "img2img", 0.5, api_name="/edit")
    assert status_of(out).startswith("✓"), out
    out = client.predict(*settings(models["digits"], steps=10, batch=2), editor, "inpaint", 0.5, api_name="/edit")
    assert status_of(out).startswith("✓"), out
    newest = max((models["base"] / "outputs").glob("*.png"))
    inpainted = np.asarray(Image.open(newest)).astype(int)
    known = picture[..., 0].astype(int)
    assert np.abs(inpainted[:, :8] - known[:, :8]).max() <= 1               # kept where nothing was painted
    assert np.abs(inpainted[:, 8:] - known[:, 8:]).max() > 10               # generated where it was painted
    unpainted = {"background": handle_file(tmp_path / "in.png"), "layers": [],
                 "composite": handle_file(tmp_path / "in.png")}
    out = client.predict(*settings(models["digits"]), unpainted, "inpaint", 0.5, api_name="/edit")
    assert status_of(out).startswith("⚠") and "paint" in status_of(out)


def test_stable_diffusion_shaped_model_txt2img_and_inpaint(client, models, tmp_path):
    if "sd" not in models:
        pytest.skip("diffusers is not installed, so no tiny Stable Diffusion folder could be written")
    from gradio_client import handle_file
    loaded = client.predict(str(models["sd"]), api_name="/load_model")
    assert loaded[0].startswith("✓ loaded sd: text-to-image"), loaded
    out = client.predict(*settings(models["sd"], sampler="DPM++ 2M Karras", steps=4, prompt="a red fox",
                                   negative="blurry", guidance=3.0, height=64, width=64), api_name="/generate")
    assert status_of(out).startswith("✓"), out
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[16:48, 16:48] = 255
    Image.fromarray(layer).save(tmp_path / "mask.png")
    editor = {"background": handle_file(tmp_path / "grey.png"), "layers": [handle_file(tmp_path / "mask.png")],
              "composite": handle_file(tmp_path / "grey.png")}
    out = client.predict(*settings(models["sd"], sampler="euler", steps=3, prompt="a vase", height=64, width=64),
                         editor, "inpaint", 1.0, api_name="/edit")
    assert status_of(out).startswith("✓"), out


@pytest.mark.parametrize("which", ["/etc/passwd", "../secret/run", "outside", "link"])
def test_paths_outside_the_model_folders_are_refused(client, models, which):
    target = {"outside": str(models.get("outside")), "link": str(models["link"])}.get(which, which)
    loaded = client.predict(target, api_name="/load_model")
    assert loaded[0].startswith("⚠") and "outside the model folders" in loaded[0], loaded
    out = client.predict(*settings(target), api_name="/generate")
    assert status_of(out).startswith("⚠") and "outside the model folders" in status_of(out)


@pytest.mark.parametrize("which", ["evil", "truncated"])
def test_hostile_files_give_a_message_and_the_server_keeps_serving(client, models, which):
    loaded = client.predict(str(models[which]), api_name="/load_model")
    status = loaded[0]
    assert status.startswith("⚠") and "Traceback" not in status and "\n" not in status, status
    assert not models["marker"].exists()                                  # the pickle never ran
    out = client.predict(*settings(models["digits"], steps=4), api_name="/generate")
    assert status_of(out).startswith("✓")


def test_the_library_lists_models_and_skips_junk(models):
    library = ModelLibrary([models["root"]])
    kinds = {e.path.name: e.kind for e in library.scan()}
    assert kinds["digits"] == "run" and kinds["evil.ckpt"] == "single-file"
    assert kinds["truncated.safetensors"] == "single-file" and "link" not in kinds    # the link leads outside
    assert "sd" not in models or kinds["sd"] == "diffusers"


def test_host_auth_and_threads():
    with pytest.raises(NoisecraftError, match="--auth"):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", [("me", "pw")])
    check_host("127.0.0.1", None)
    assert parse_auth("me:secret:x", None) == [("me", "secret:x")]
    with pytest.raises(NoisecraftError, match="USER:PASS"):
        parse_auth("nopassword", None)


def test_the_command_refuses_an_open_host_without_a_password(capsys):
    assert main(["ui", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--auth" in err[0]


def test_restore_settings_from_a_png(client, models, server):
    from gradio_client import handle_file
    client.predict(*settings(models["digits"], label="7", sampler="euler", steps=6, seed=11), api_name="/generate")
    newest = max(server["outputs"].glob("*.png"))
    restored = client.predict(handle_file(newest), api_name="/restore")
    assert restored[0].startswith("✓")
    assert restored[6] == "euler" and restored[7] == 6 and restored[9] == 11 and restored[4] == "7"
    junk = models["base"] / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    restored = client.predict(handle_file(junk), api_name="/restore")
    assert restored[0].startswith("⚠")


def test_forward_process_view(client, tmp_path):
    from gradio_client import handle_file
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "x0.png")
    picture, numbers = client.predict(handle_file(tmp_path / "x0.png"), "cosine", 500, 0, api_name="/forward")
    assert Path(picture).is_file() and numbers.startswith("t = 500") and "SNR_t" in numbers


def test_the_gallery_keeps_a_bounded_number_of_thumbnails(client, models, monkeypatch):
    from noisecraft.ui import app
    monkeypatch.setattr(app, "GALLERY_KEEP", 3)
    for seed in range(5):
        out = client.predict(*settings(models["digits"], steps=1, seed=seed, preview_every=0), api_name="/generate")
        assert status_of(out).startswith("✓")
    assert len(out[2]) == 3 and out[2][0]["caption"].endswith("seed 4")      # the newest first, the oldest dropped


def test_the_command_serves_the_page_on_127_0_0_1(models, tmp_path):
    import subprocess
    import sys
    import urllib.request
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "noisecraft", "ui", "--models", str(models["root"]), "--port",
                             str(port), "--outputs", str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None and "<html" in page.lower()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "torch uses 1 thread(s) in this server" in out or "thread(s) in this server" in out
    assert "Traceback" not in out


def test_the_trajectory_of_a_generation(client, models):
    strip, gif, message = client.predict(str(models["digits"]), "", "3", 10, 0, 5, api_name="/trajectory")
    assert message.startswith("✓"), message
    assert Image.open(strip).size[0] > 0 and Path(gif).is_file()
    strip, gif, message = client.predict("/etc/passwd", "", "none", 10, 0, 5, api_name="/trajectory")
    assert message.startswith("⚠") and "outside the model folders" in message


def test_latent_channels_of_a_picture_in_the_learn_tab(client, models, tmp_path):
    """Watch and learn, for latent models: x, D(z) and the four channels of z = s·E(x), uploaded or generated."""
    if "sd" not in models:
        pytest.skip("diffusers is not installed, so no tiny Stable Diffusion folder could be written")
    from gradio_client import handle_file

    from noisecraft.ui import learn
    picture = np.zeros((48, 48, 3), np.uint8)
    picture[8:40, 16:32] = (255, 64, 0)
    Image.fromarray(picture).save(tmp_path / "upload.png")
    view, message = client.predict(str(models["sd"]), handle_file(tmp_path / "upload.png"), api_name="/latents")
    assert message.startswith("✓ the uploaded picture: z is 4×"), message
    shown = Image.open(view)
    assert shown.width > 4 * shown.height                  # x, D(z) and z[0..3] in one row, captions below
    view, message = client.predict(str(models["sd"]), None, api_name="/latents")
    assert message.startswith("✓") and "z is 4×" in message, message
    view, message = client.predict(str(models["digits"]), None, api_name="/latents")
    assert view is None and message.startswith("⚠") and "pixel space" in message
    assert "LDM" in learn.LATENT_CAPTION


def test_prompt_mixing_is_the_mixed_embedding(client, models, server):
    """A second prompt and its weight: the picture is pipe.sample(prompt=pipe.mix_prompts(a, b, w)), and the PNG
    keeps both prompts and the weight (as `sample --mix-prompt B --mix w` writes them), and /restore brings them
    back."""
    if "sd" not in models:
        pytest.skip("diffusers is not installed, so no tiny Stable Diffusion folder could be written")
    from noisecraft.io.png_params import read_png_params
    from noisecraft.pipelines.stable_diffusion import load_pipeline
    from noisecraft.viz.images import to_uint8
    kw = {"sampler": "euler", "steps": 3, "seed": 4, "prompt": "a red fox", "height": 64, "width": 64,
          "preview_every": 0}
    out = client.predict(*settings(models["sd"], prompt_b="a blue car", mix=0.5, **kw), api_name="/generate")
    assert status_of(out).startswith("✓"), out
    mixed_png = max(server["outputs"].glob("*.png"))
    params = read_png_params(mixed_png)
    assert params["prompt"] == "a red fox" and params["mix_prompt"] == "a blue car" and params["mix"] == 0.5
    pipe = load_pipeline(models["sd"])
    direct = pipe.sample(1, sampler="euler", steps=3, seed=4, height=64, width=64,
                         prompt=pipe.mix_prompts("a red fox", "a blue car", 0.5))
    assert np.array_equal(np.asarray(Image.open(mixed_png)), to_uint8(direct.images)[0])
    from gradio_client import handle_file
    restored = client.predict(handle_file(mixed_png), api_name="/restore")
    assert restored[0].startswith("✓") and restored[2] == "a red fox" and restored[-2:] == ("a blue car", 0.5)
    out = client.predict(*settings(models["sd"], **kw), api_name="/generate")
    plain = np.asarray(Image.open(max(server["outputs"].glob("*.png"))))
    assert not np.array_equal(plain, np.asarray(Image.open(mixed_png)))         # the weight changed the picture
    with pytest.raises(gradio_client.exceptions.AppError, match="greater than maximum"):      # the slider's bounds
        client.predict(*settings(models["sd"], prompt_b="a blue car", mix=1.5, **kw), api_name="/generate")
    out = client.predict(*settings(models["digits"], prompt_b="a blue car", mix=0.5, steps=2), api_name="/generate")
    assert status_of(out).startswith("⚠") and "not text-conditional" in status_of(out)


def test_seed_and_prompt_interpolation_strip(client, models):
    """One picture: `frames` images from seed A's to seed B's, the class (or the prompt) moving too."""
    out = client.predict(*settings(models["digits"], label="3", sampler="ddim", steps=4, seed=1), 2, 4, "", "8",
                         api_name="/interpolate")
    strip, message = out
    assert message.startswith("✓ 4 pictures from seed 1 to seed 2 and from label 3 to 8"), message
    picture = np.asarray(Image.open(strip))
    assert picture.shape[1] == 4 * picture.shape[0] + 3 * 2         # four square pictures, three 2-pixel gaps
    from noisecraft.pipelines.stable_diffusion import load_pipeline
    from noisecraft.ui.app import interpolation_strip
    pipe = load_pipeline(models["digits"])
    direct = pipe.interpolate_seeds(1, 2, 4, label=3, label_b=8, sampler="ddim", steps=4)
    # the server's handler thread runs torch with its own thread count, so float sums may be ordered differently
    # and 4 DDIM steps of a random tiny net magnify that to a few levels of 255 here and there
    expected = interpolation_strip(direct.images).astype(np.int16)
    assert np.abs(picture.astype(np.int16) - expected).mean() < 2.0
    out = client.predict(*settings(models["digits"], steps=4), 2, 3, "a blue car", "none", api_name="/interpolate")
    assert not isinstance(out[0], str) and out[1].startswith("⚠") and "not text-conditional" in out[1]
    if "sd" in models:
        out = client.predict(*settings(models["sd"], prompt="a red fox", sampler="euler", steps=3, seed=0, height=64,
                                       width=64), 5, 3, "a blue car", "none", api_name="/interpolate")
        assert out[1].startswith("✓ 3 pictures from seed 0 to seed 5 and from “a red fox” to “a blue car”"), out[1]
