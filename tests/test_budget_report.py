"""benchmarks/mnist_budget.py's report: which row is a recipe's default, and the issue's goals taken over BOTH of our
recipes (whichever wins), on small synthetic result files."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_budget.py"


@pytest.fixture(scope="module")
def budget():
    spec = importlib.util.spec_from_file_location("mnist_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(sampler, steps, nfe, score, spacing="karras", **extra):
    return dict(sampler=sampler, steps=steps, nfe=nfe, score=score, spacing=spacing, **extra)


def write(out: Path, recipe: str, samples, suffix=""):
    result = dict(parameters=1000, steps=50, train_images_per_s=10.0, cpu_minutes=20.0, n=100, samples=samples)
    (out / f"mnist-{recipe}{suffix}.json").write_text(json.dumps(result))


def test_default_row_is_the_marked_one_or_our_runs_defaults(budget):
    vp = [row("ddpm", 10, 10, 3.0, spacing="leading"), row("ddim", 50, 50, 2.0, spacing="leading")]
    assert budget.default_row("noisecraft", vp)["sampler"] == "ddpm"   # pipelines/defaults.py: DDPM-10, leading
    edm = [row("heun", 5, 9, 6.0), row("heun", 10, 19, 4.0)]
    assert budget.default_row("noisecraft-edm", edm)["steps"] == 10     # Heun-10 on Karras σ's
    peer = [row("own sampler, 20 NFE", 20, 20, 9.0, spacing=None), row("own default", 50, 50, 8.0, default=True)]
    assert budget.default_row("diffusers", peer)["score"] == 8.0
    assert budget.default_row("lucidrains", peer[:1]) is None          # its default was not drawn


def test_goals_are_taken_over_both_recipes(budget, tmp_path, capsys):
    write(tmp_path, "noisecraft", [row("ddpm", 10, 10, 3.6, spacing="leading"), row("ddim", 50, 50, 3.2, spacing="leading"),
                                   row("dpmpp_2m", 20, 20, 2.4)])
    write(tmp_path, "noisecraft-edm", [row("heun", 10, 19, 4.3), row("dpmpp_2m", 20, 20, 1.5)])
    write(tmp_path, "noisecraft", [row("dpmpp_2m", 20, 20, 2.2), row("ddpm", 1000, 1000, 2.0, spacing="leading")],
          suffix="-ref")
    budget.report(tmp_path, "mnist")
    text = capsys.readouterr().out
    # goal 1: the EDM run's DPM++ 2M (1.5) is the best at ≤ 20 NFE, against the VP run's DDIM-50 (3.2)
    assert "goal 1: our best at ≤ 20 NFE, noisecraft-edm dpmpp_2m 20 (20 NFE): 1.50" in text
    assert "ratio 0.47" in text
    assert "goal 2 at 1000 NFE, noisecraft (n = 100): dpmpp_2m 20 (20 NFE) 2.20 vs ddpm 1000 2.00: +10%" in text
    assert "| noisecraft | 1,000 | 50 | 10.0 | ddpm 10 (10 NFE) | 3.60 |" in text
    assert (tmp_path / "mnist_sampler_nfe.png").stat().st_size > 0


def test_budget_run_settings_by_name_or_written_out():
    spec = importlib.util.spec_from_file_location("budget_run", SCRIPT.parent / "budget_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_settings("ref") == module.REF_SETTINGS
    assert module.parse_settings("ddim:20,dpmpp_2m:20:karras") == [("ddim", 20, None), ("dpmpp_2m", 20, "karras")]
    with pytest.raises(SystemExit, match="sampler:steps"):
        module.parse_settings("ddim")


def test_budget_run_settings_without_spacing_keep_leading_steps_on_vp_runs(tmp_path):
    """A VP pixel run now defaults to Karras σ's; `ddim:2` must still mean DDIM on leading steps, as the stored rows
    were drawn, and the run's own default is drawn once, marked."""
    from test_guidance import write_run
    spec = importlib.util.spec_from_file_location("budget_run", SCRIPT.parent / "budget_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [row for row, _ in module.draws_ours(write_run(tmp_path / "run"), "cpu", 2, [("ddim", 2, None)], 0)]
    assert [(r["sampler"], r["spacing"]) for r in rows] == [("ddim", "leading"),
                                                              ("default (dpmpp_2m_sde)", "karras")]
    assert rows[-1]["default"] and rows[-1]["steps"] == 20


def test_budget_run_trains_and_draws_a_latent_run(tmp_path):
    """--latent VAE_RUN: the run keeps a copy of the VAE, samples come back as decoded pixels, and a latent run's
    default (DDPM-10) is the row marked default."""
    from noisecraft.data.datasets import load_dataset
    from noisecraft.models.vae import VAEConfig
    from noisecraft.training.vae_trainer import VAETrainConfig, train_vae
    spec = importlib.util.spec_from_file_location("budget_run", SCRIPT.parent / "budget_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    digits = load_dataset("digits").subset(80)
    train_vae(VAEConfig(block_out_channels=(8, 8), latent_channels=2, mid_attention=False),
              VAETrainConfig(steps=1, batch_size=8, scale_images=16, eval_images=8), digits, tmp_path / "vae",
              test_dataset=digits.subset(8), progress=False)
    folder = tmp_path / "models" / "digits-noisecraft-latent"
    stats = module.train_ours(digits, "noisecraft", 0.0, folder, 0, vae_run=str(tmp_path / "vae"))
    assert stats["steps"] == 0 and (folder / "vae" / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["latent"]["latent_shape"] == [2] + [side // 2 for side in digits.image_shape[1:]]   # one 2× level
    rows = list(module.draws_ours(folder, "cpu", 2, [("ddpm", 2, None)], 0))
    assert [(r["sampler"], r["steps"], r.get("default", False)) for r, _ in rows] == [
        ("ddpm", 2, False), ("default (ddpm)", 10, True)]
    assert tuple(rows[0][1].shape) == (2, *digits.image_shape)


def test_text_to_image_score_redraws_a_kept_run_with_each_setting(tmp_path):
    """text_to_image.py score: each setting drawn at each given guidance, one row per pair, with its NFE."""
    from test_guidance import write_run
    spec = importlib.util.spec_from_file_location("text_to_image", SCRIPT.parent / "text_to_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    write_run(tmp_path / "digits" / "runs" / "pixel", num_classes=10)
    module.main(["score", "--dataset", "digits", "--out", str(tmp_path), "--settings", "ddpm:2,heun:2:karras",
                 "--guidance", "2", "--per-class", "2", "--threads", "1"])
    rows = json.loads((tmp_path / "digits" / "pixel-settings.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"], r["spacing"], r["guidance"], r["samples"]) for r in rows] == [
        ("ddpm", 2, None, 2.0, 20), ("heun", 3, "karras", 2.0, 20)]
    assert all(0 <= r["accuracy"] <= 1 and r["domain_score"] >= 0 for r in rows)
    # a guidance sweep: one row (and one grid) per scale
    module.main(["score", "--dataset", "digits", "--out", str(tmp_path), "--settings", "ddpm:2",
                 "--guidance", "0,3", "--per-class", "2", "--threads", "1"])
    rows = json.loads((tmp_path / "digits" / "pixel-settings.json").read_text())["rows"]
    assert [(r["sampler"], r["guidance"]) for r in rows] == [("ddpm", 0.0), ("ddpm", 3.0)]
    assert rows[0]["domain_score"] != rows[1]["domain_score"]
    assert sorted(p.name for p in (tmp_path / "digits").glob("pixel-ddpm-2-w*_grid.png")) == [
        "pixel-ddpm-2-w0_grid.png", "pixel-ddpm-2-w3_grid.png"]
    module.main(["plot", "--dataset", "digits", "--out", str(tmp_path),
                 "--rows", str(tmp_path / "digits" / "pixel-settings.json")])
    assert (tmp_path / "digits" / "pixel-guidance.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no settings file"):
        module.main(["plot", "--dataset", "digits", "--out", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="a list of numbers"):
        module.main(["score", "--dataset", "digits", "--out", str(tmp_path), "--guidance", "four"])
    with pytest.raises(SystemExit, match="no kept run"):
        module.main(["score", "--dataset", "digits", "--out", str(tmp_path / "empty")])
