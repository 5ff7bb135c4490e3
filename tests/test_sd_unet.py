"""Stable Diffusion's U-Net: noisecraft's UNet against diffusers' UNet2DConditionModel.

Tiny random diffusers U-Nets (fixed seeds) are saved with save_pretrained, loaded with load_diffusers_unet, and must
give the same outputs on the same latents, timesteps (integer and fractional) and text context. Our own text UNet
goes the other way through save_diffusers_unet and diffusers' from_pretrained. Full-size SD 1.x / 2.x U-Nets are
built on the "meta" device only (no memory), to compare parameter counts and key sets.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from noisecraft.convert.diffusers_unet import (  # noqa: E402
    diffusers_unet_key_map,
    load_diffusers_unet,
    save_diffusers_unet,
    sd_unet_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers_state_dict,
    unet_to_diffusers_state_dict,
)
from noisecraft.errors import NoisecraftError  # noqa: E402
from noisecraft.models.attention import set_attention_slicing  # noqa: E402
from noisecraft.models.unet import UNet, UNetConfig, count_parameters  # noqa: E402

CONTEXT = 24

SD1_LIKE = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=CONTEXT, attention_head_dim=2,
                norm_num_groups=8, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD2_LIKE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=CONTEXT,
                attention_head_dim=(2, 4, 8), use_linear_projection=True, transformer_layers_per_block=2,
                norm_num_groups=8, sample_size=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD2_CONFIG = {**SD15_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
              "use_linear_projection": True, "sample_size": 96}


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference(in_channels=4, out_channels=4, **settings) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(in_channels=in_channels, out_channels=out_channels, **settings).eval()


@torch.no_grad()
def assert_same_outputs(ours: UNet, theirs: UNet2DConditionModel, in_channels=4, size=(8, 8)):
    x = randn(2, in_channels, *size, seed=1)
    context = randn(2, 5, CONTEXT, seed=2)
    for t in (torch.tensor([10, 999]), torch.tensor([0.5, 500.25])):      # integer and fractional timesteps
        expected = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
        assert got.shape == expected.shape == (2, 4, *size)
        assert expected.abs().max() > 0.1                                  # not a trivially zero output
        assert (got - expected).abs().max() < 1e-4, (got - expected).abs().max()


def assert_same_keys(ours: UNet, theirs: UNet2DConditionModel):
    key_map = diffusers_unet_key_map(ours)
    assert set(key_map) == set(ours.state_dict())
    assert len(set(key_map.values())) == len(key_map)                       # one-to-one
    assert set(key_map.values()) == set(theirs.state_dict())
    own, ref = ours.state_dict(), theirs.state_dict()
    assert all(own[k].shape == ref[v].shape for k, v in key_map.items())


# ---------------------------------------------------------------- diffusers -> noisecraft


@pytest.mark.parametrize("settings, in_channels, safe", [
    (SD1_LIKE, 4, True),     # additive time conditioning, 1×1 conv projections, 2 heads everywhere
    (SD2_LIKE, 4, True),     # linear projections, heads per level, transformer depth 2
    (SD1_LIKE, 9, False),    # the inpainting model's 9 input channels, from a .bin file
], ids=["sd1-like", "sd2-like", "inpaint-bin"])
def test_loaded_diffusers_unet_gives_the_same_outputs(tmp_path, settings, in_channels, safe):
    theirs = reference(in_channels, **settings)
    theirs.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("diffusion_pytorch_model." + ("safetensors" if safe else "bin"))).is_file()
    ours = load_diffusers_unet(tmp_path)
    assert not ours.training
    c = ours.config
    assert c.time_conditioning == "additive" and c.linear_projection == settings.get("use_linear_projection", False)
    assert c.in_channels == in_channels and c.out_channels == 4 and c.context_dim == CONTEXT
    assert_same_keys(ours, theirs)
    assert_same_outputs(ours, theirs, in_channels)


def test_odd_latent_size_matches_diffusers(tmp_path):
    # 12×10 with three levels: 12 -> 6 -> 3 and 10 -> 5 -> 3; on the way up 3 -> 5 must meet the 5-wide skip.
    theirs = reference(**SD2_LIKE)
    theirs.save_pretrained(tmp_path)
    assert_same_outputs(load_diffusers_unet(tmp_path), theirs, size=(12, 10))


def test_sd_configs_match_diffusers_full_size_on_meta():
    for version, config in (("1.x", SD15_CONFIG), ("2.x", SD2_CONFIG)):
        ours_config = sd_unet_config(version)
        assert unet_config_from_diffusers(config) == ours_config
        with torch.device("meta"):       # no memory: 3.4 GB of weights are never allocated
            ours = UNet(ours_config)
            theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(ours_config))
            reference_model = UNet2DConditionModel.from_config(config)
        assert count_parameters(ours) == count_parameters(reference_model) == count_parameters(theirs)
        if version == "1.x":
            assert count_parameters(ours) == 859_520_964
        assert_same_keys(ours, reference_model)
    inpaint = sd_unet_config("1.x", in_channels=9)
    assert inpaint.in_channels == 9 and inpaint.out_channels == 4
    with pytest.raises(NoisecraftError, match="unknown Stable Diffusion version"):
        sd_unet_config("3")


# ---------------------------------------------------------------- noisecraft -> diffusers


@torch.no_grad()
def our_text_unet(seed=0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=4, context_dim=CONTEXT))    # noisecraft defaults: FiLM (scale_shift)
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():                                       # wake the zero-initialised layers
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_our_text_unet_round_trips_through_a_diffusers_folder(tmp_path):
    ours = our_text_unet()
    folder = save_diffusers_unet(ours, tmp_path / "unet")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["resnet_time_scale_shift"] == "scale_shift"
    theirs = UNet2DConditionModel.from_pretrained(folder).eval()
    assert_same_keys(ours, theirs)
    assert_same_outputs(ours, theirs)

    again = load_diffusers_unet(folder)
    assert again.config.time_conditioning == "scale_shift" and again.config.context_dim == CONTEXT
    for (name, a), (other, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert name == other and torch.equal(a, b), name
    x, t, context = randn(1, 4, 8, 8), torch.tensor([77.0]), randn(1, 3, CONTEXT, seed=3)
    with torch.no_grad():
        assert torch.equal(ours(x, t, context), again(x, t, context))


def test_state_dict_round_trip_does_not_share_memory():
    ours = our_text_unet()
    weights = unet_to_diffusers_state_dict(ours)
    assert "time_embedding.linear_1.weight" in weights and "mid_block.resnets.1.time_emb_proj.bias" in weights
    again = unet_from_diffusers_state_dict(ours.config, weights)
    with torch.no_grad():
        again.conv_in.weight.zero_()
        again.time_embed.mlp[0].weight.zero_()
    assert ours.conv_in.weight.abs().sum() > 0 and ours.time_embed.mlp[0].weight.abs().sum() > 0


def test_pixel_and_class_models_do_not_export():
    for config in (UNetConfig(), UNetConfig(num_classes=10)):
        with pytest.raises(NoisecraftError, match="only text-conditional models export to UNet2DConditionModel"):
            unet_config_to_diffusers(config)
        with pytest.raises(NoisecraftError, match="only text-conditional models"):
            diffusers_unet_key_map(config)


# ---------------------------------------------------------------- dtype and attention slicing


def test_bfloat16_forward_is_close_to_float32_and_returns_the_input_dtype():
    model = our_text_unet()
    x, t, context = randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), randn(2, 3, CONTEXT, seed=3)
    with torch.no_grad():
        full = model(x, t, context)
        half_model = our_text_unet().to(torch.bfloat16)
        half = half_model(x, t, context)
        assert half.dtype == torch.float32
        assert half_model(x.to(torch.bfloat16), t, context).dtype == torch.bfloat16
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.05 * full.abs().max() + 0.05


def test_attention_slicing_equals_no_slicing():
    text = our_text_unet()
    torch.manual_seed(0)
    pixel = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mults=(1, 2), attention_levels=(0, 1),
                            head_dim=4, groups=4, dropout=0.0)).eval()
    with torch.no_grad():
        for p in pixel.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for model, x, context in ((text, randn(2, 4, 8, 8), randn(2, 3, CONTEXT, seed=3)), (pixel, randn(2, 1, 8, 8), None)):
        t = torch.tensor([10.0, 900.0])
        with torch.no_grad():
            whole = model(x, t, context)
            assert set_attention_slicing(model, 5) is model                # 64 queries in slices of 5 (uneven)
            sliced = model(x, t, context)
            set_attention_slicing(model, None)
            again = model(x, t, context)
        assert not torch.equal(whole, torch.zeros_like(whole))
        # float32: attention over query slices vs all at once (other GEMM shapes), outputs ≤ ~2 (6e-7 seen) → 1e-5
        torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)
        assert torch.equal(again, whole)
    with pytest.raises(NoisecraftError, match="slice size must be a positive integer"):
        set_attention_slicing(text, 0)


# ---------------------------------------------------------------- config fields


def test_new_config_fields_round_trip_through_json_and_old_configs_load():
    config = sd_unet_config("2.x")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["num_heads"] == [5, 10, 20, 20] and data["time_conditioning"] == "additive"
    assert UNetConfig.from_dict(data) == config and UNetConfig.from_dict(data).num_heads == (5, 10, 20, 20)
    old = UNetConfig(in_channels=4, context_dim=8).to_dict()
    for key in ("num_heads", "time_conditioning", "linear_projection", "norm_eps"):
        del old[key]                                                       # a config.json written before them
    assert UNetConfig.from_dict(old) == UNetConfig(in_channels=4, context_dim=8)


@pytest.mark.parametrize("bad, pattern", [
    (dict(num_heads=3), "width 32 of level 0 is not divisible by its num_heads 3"),
    (dict(num_heads=(2, 2)), "one positive integer per level"),
    (dict(num_heads=0), "num_heads must be"),
    (dict(time_conditioning="film"), "time_conditioning must be"),
    (dict(norm_eps=0), "norm_eps must be a positive number"),
    (dict(linear_projection="yes"), "linear_projection must be true or false"),
])
def test_new_config_fields_are_validated(bad, pattern):
    with pytest.raises(NoisecraftError, match=pattern):
        UNetConfig(in_channels=4, context_dim=8, attention_levels=(0, 2), **bad)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("setting, value", [
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("addition_embed_type", "text"),
    ("time_embedding_type", "fourier"), ("flip_sin_to_cos", False), ("freq_shift", 1), ("conv_in_kernel", 1),
    ("only_cross_attention", True), ("dual_cross_attention", True), ("resnet_time_scale_shift", "ada_group"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), ("block_out_channels", [32, 48]),
    ("transformer_layers_per_block", [1, 2]), ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]),
])
def test_unsupported_diffusers_settings_are_named(setting, value):
    config = {**SD15_CONFIG, **SD1_LIKE, setting: value}
    with pytest.raises(NoisecraftError, match=f"setting {setting}=") as info:
        unet_config_from_diffusers(config, "unet/config.json")
    assert str(info.value).startswith("unet/config.json: ")


def test_accepted_diffusers_settings():
    config = unet_config_from_diffusers({**SD15_CONFIG, "upcast_attention": True, "sample_size": 96,
                                         "center_input_sample": False, "dropout": 0.1})
    assert config.dropout == 0.1 and config.num_heads == 8 and config.attention_levels == (0, 1, 2)
    with pytest.raises(NoisecraftError, match="AutoencoderKL, not a UNet2DConditionModel"):
        unet_config_from_diffusers({**SD15_CONFIG, "_class_name": "AutoencoderKL"})


def test_bad_state_dicts_name_the_keys():
    ours = our_text_unet()
    good = unet_to_diffusers_state_dict(ours)
    missing = {k: v for k, v in good.items() if k != "conv_in.weight"}
    with pytest.raises(NoisecraftError, match=r"1 missing \(e\.g\. conv_in\.weight\)"):
        unet_from_diffusers_state_dict(ours.config, missing, "my.safetensors")
    extra = {**good, "down_blocks.0.resnets.0.bogus.weight": torch.zeros(1)}
    with pytest.raises(NoisecraftError, match=r"1 unexpected \(e\.g\. down_blocks\.0\.resnets\.0\.bogus\.weight\)"):
        unet_from_diffusers_state_dict(ours.config, extra)
    shape = {**good, "mid_block.resnets.0.time_emb_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(NoisecraftError, match=r"mid_block\.resnets\.0\.time_emb_proj\.weight: \(3, 3\)"):
        unet_from_diffusers_state_dict(ours.config, shape)
