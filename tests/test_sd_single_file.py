"""Stable Diffusion single-file layout <-> diffusers layout (io/sd_single_file.py).

The decisive check: diffusers' own single-file converters read what diffusers_to_single_file writes and give back
the original tensors, so our original layout is the real one, independently of our inverse.
"""

import os
import random

import pytest
import torch

from noisecraft.convert.sd_single_file import (
    PREFIXES,
    diffusers_to_single_file,
    read_single_file,
    single_file_to_diffusers,
    unet_ldm_key_map,
    vae_ldm_key_map,
    write_single_file,
)
from noisecraft.errors import NoisecraftError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

UNETS = {
    # two levels, attention at the finest only; conv proj_in (SD 1.x style)
    "two-level": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                      attention_head_dim=8),
    # SD 1.x's pattern on three levels, inpainting input, 768-wide text, Linear proj_in, two transformer blocks
    "three-level": dict(block_out_channels=(32, 64, 64), in_channels=9,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        cross_attention_dim=768, attention_head_dim=8, use_linear_projection=True,
                        transformer_layers_per_block=2),
}


def _unet(name):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(layers_per_block=2, norm_num_groups=8, sample_size=8, **UNETS[name])


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    unets = {name: _unet(name) for name in UNETS}
    return {"unets": {n: (dict(u.config), u.state_dict()) for n, u in unets.items()},
            "vae": (dict(vae.config), vae.state_dict()),
            # transformers 5 names the keys without "text_model."; SD's text_encoder/ folder has it
            "text": {f"text_model.{k}": v for k, v in text.state_dict().items()}}


def _single(parts, name="two-level", text_prefix=True):
    unet_config, unet = parts["unets"][name]
    vae_config, vae = parts["vae"]
    text = parts["text"] if text_prefix else {k[len("text_model."):]: v for k, v in parts["text"].items()}
    return diffusers_to_single_file(unet, vae, text, unet_config, vae_config)


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", list(UNETS))
def test_diffusers_own_converters_read_our_layout(parts, name):
    single = _single(parts, name, text_prefix=False)
    unet_config, unet = parts["unets"][name]
    _assert_same(convert_ldm_unet_checkpoint(single, unet_config), unet)
    vae_config, vae = parts["vae"]
    _assert_same(convert_ldm_vae_checkpoint(single, vae_config), vae)
    text = convert_ldm_clip_checkpoint(single)
    assert torch.equal(text.pop("text_model.embeddings.position_ids"), torch.arange(77)[None])
    _assert_same(text, parts["text"])
    assert all(k.startswith(tuple(PREFIXES.values())) for k in single)


def test_original_layout_facts(parts):
    single = _single(parts, "three-level")
    u, v = PREFIXES["unet"], PREFIXES["vae"]
    assert single[v + "encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)      # 1×1 conv as in SD's files
    assert single[v + "decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    # decoder levels are numbered the other way round: diffusers' up_blocks.0 (coarsest) is up.1
    assert torch.equal(single[v + "decoder.up.1.upsample.conv.weight"],
                       parts["vae"][1]["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert single[u + "input_blocks.0.0.weight"].shape[1] == 9
    assert u + "input_blocks.3.0.op.weight" in single and u + "output_blocks.5.2.conv.weight" in single
    assert u + "output_blocks.2.1.conv.weight" in single                              # no attention at that level
    assert vae_ldm_key_map(parts["vae"][0])["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == \
        "decoder.up.0.block.0.nin_shortcut.weight"
    assert unet_ldm_key_map(parts["unets"]["two-level"][0])["up_blocks.0.resnets.2.conv_shortcut.bias"] == \
        "output_blocks.2.0.skip_connection.bias"


@pytest.mark.parametrize("name", list(UNETS))
def test_round_trip_and_inferred_configs(parts, name):
    out = single_file_to_diffusers(_single(parts, name))
    unet_config, unet = out["unet"]
    vae_config, vae = out["vae"]
    text_config, text = out["text_encoder"]
    _assert_same(unet, parts["unets"][name][1])
    _assert_same(vae, parts["vae"][1])
    _assert_same(text, parts["text"])
    assert list(out["ignored"][1]) == [PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"]

    original = parts["unets"][name][0]
    for key in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                "transformer_layers_per_block"):
        assert unet_config[key] == original[key], key
    assert tuple(unet_config["block_out_channels"]) == original["block_out_channels"]
    assert tuple(unet_config["down_block_types"]) == original["down_block_types"]
    assert tuple(unet_config["up_block_types"]) == original["up_block_types"]
    # head counts are not in the file: SD 1.x's 8 at 768-wide text, else 64-wide heads (one head below 64)
    assert unet_config["attention_head_dim"] == (8 if original["cross_attention_dim"] == 768 else [1, 1])
    assert (vae_config["latent_channels"], vae_config["layers_per_block"]) == (4, 2)
    assert vae_config["scaling_factor"] == 0.18215
    assert (text_config["hidden_size"], text_config["num_hidden_layers"], text_config["intermediate_size"],
            text_config["vocab_size"], text_config["max_position_embeddings"], text_config["eos_token_id"]) == \
        (32, 2, 37, 1000, 77, 2)

    # the inferred configs build models of exactly these shapes
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(diffusers.UNet2DConditionModel.from_config(unet_config).state_dict()) == shapes(unet)
    assert shapes(diffusers.AutoencoderKL.from_config(vae_config).state_dict()) == shapes(vae)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(text_config))
    assert shapes({f"text_model.{k}": v for k, v in clip.state_dict().items()}) == shapes(text)


def test_dropped_keys_are_listed(parts):
    single = _single(parts)
    extra = {"model_ema.decay": torch.tensor(0.999), "model_ema.diffusion_modeltime_embed0weight": torch.zeros(2),
             "alphas_cumprod": torch.ones(10), "betas": torch.ones(10),
             PREFIXES["vae"] + "loss.logvar": torch.zeros(())}
    out = single_file_to_diffusers({**single, **extra})
    assert set(out["ignored"][1]) == set(extra) | {PREFIXES["text_encoder"] + "text_model.embeddings.position_ids"}
    _assert_same(out["vae"][1], parts["vae"][1])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_file_round_trip(parts, tmp_path, suffix):
    single = _single(parts)
    path = write_single_file(single, tmp_path / f"model{suffix}")
    _assert_same(read_single_file(path), single)


def test_ckpt_wrapper_and_content_sniffing(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tensors, "global_step": 5, "epoch": 1}, path)
    _assert_same(read_single_file(path), tensors)
    misnamed = tmp_path / "really_a_zip.safetensors"            # a torch zip behind a .safetensors name
    misnamed.write_bytes(path.read_bytes())
    _assert_same(read_single_file(misnamed), tensors)
    with pytest.raises(NoisecraftError, match="format"):
        write_single_file(tensors, tmp_path / "model.txt")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_damaged_and_unsafe_files_are_refused(parts, tmp_path):
    good = write_single_file({"a": torch.zeros(1000)}, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:2000])
    ckpt = write_single_file({"a": torch.zeros(1000)}, tmp_path / "good.ckpt")
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(ckpt.read_bytes()[:1500])
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(b"\x00" + random.Random(0).randbytes(5000))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": _RunsCode(marker)}, evil)
    for path in (cut, cut_ckpt, noise, evil, tmp_path / "missing.ckpt"):
        with pytest.raises(NoisecraftError):
            read_single_file(path)
    assert not marker.exists()


def test_not_a_sd1_single_file(parts):
    single = _single(parts)
    unet_and_vae = {k: v for k, v in single.items() if not k.startswith(PREFIXES["text_encoder"])}
    with pytest.raises(NoisecraftError, match="SDXL"):
        single_file_to_diffusers({**unet_and_vae, "conditioner.embedders.1.model.positional_embedding": torch.zeros(1)})
    with pytest.raises(NoisecraftError, match="OpenCLIP"):
        single_file_to_diffusers({**unet_and_vae, "cond_stage_model.model.token_embedding.weight": torch.zeros(1)})
    with pytest.raises(NoisecraftError, match=r"cond_stage_model\.transformer"):
        single_file_to_diffusers(unet_and_vae)
    with pytest.raises(NoisecraftError, match=r"first_stage_model"):
        single_file_to_diffusers({k: v for k, v in single.items() if not k.startswith(PREFIXES["vae"])})
    with pytest.raises(NoisecraftError, match="diffusers-layout"):
        single_file_to_diffusers(parts["unets"]["two-level"][1])
    with pytest.raises(NoisecraftError, match="unexpected"):
        single_file_to_diffusers({**single, PREFIXES["unet"] + "label_emb.0.0.weight": torch.zeros(1)})
    with pytest.raises(NoisecraftError, match="missing"):
        single_file_to_diffusers({k: v for k, v in single.items()
                                  if not k.endswith("output_blocks.1.0.out_layers.3.bias")})
