"""Hugging Face-format component folders load into noisecraft's modules with identical outputs."""

from __future__ import annotations

import pytest
import torch

from noisecraft.convert.hf_format import load_diffusers_vae, load_transformers_clip_text
from noisecraft.errors import NoisecraftError


def test_a_diffusers_vae_folder_loads_with_identical_outputs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.18215).eval()
    with torch.no_grad():   # GroupNorm affine parameters start at 1/0; perturb them so they matter
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "vae")
    ours, scale = load_diffusers_vae(tmp_path / "vae")
    assert scale == pytest.approx(0.18215)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist
        posterior = ours.encode(x)
        # float32, diffusers' kernels vs ours: latents ≤ ~1, decoded pixels ≤ ~1 after a few convs and GroupNorms
        # (2e-6 seen) → atol 1e-5, far below the values compared.
        torch.testing.assert_close(posterior.mean, expected.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(posterior.mean), ref.decode(expected.mean).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eos_token_id", [2, 49407])
def test_a_transformers_clip_text_folder_loads_with_identical_outputs(tmp_path, eos_token_id):
    transformers = pytest.importorskip("transformers")
    from noisecraft.models.tokenizer import CLIPTokenizer
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77,
                                         eos_token_id=eos_token_id)
    ref = transformers.CLIPTextModel(config).eval()
    ref.save_pretrained(tmp_path / "text_encoder")
    ours = load_transformers_clip_text(tmp_path / "text_encoder")
    ids = CLIPTokenizer.from_bpe_file()(["a photo of an astronaut riding a horse on mars", ""])
    with torch.no_grad():
        out = ref(input_ids=ids)
        hidden, pooled = ours(ids)
    # float32, transformers' kernels vs ours: values ≤ ~4 after the final LayerNorm, a few ulps → atol 1e-5
    torch.testing.assert_close(hidden, out.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=1e-5, atol=1e-5)


def test_bad_component_folders_get_one_clear_sentence(tmp_path):
    with pytest.raises(NoisecraftError, match="no config.json"):
        load_diffusers_vae(tmp_path)
    (tmp_path / "config.json").write_text('{"block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4}')
    with pytest.raises(NoisecraftError, match="no weights file"):
        load_diffusers_vae(tmp_path)
    from noisecraft.io.checkpoint import save_weights
    save_weights({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(NoisecraftError, match="missing"):
        load_diffusers_vae(tmp_path)
    with pytest.raises(NoisecraftError, match="lacks hidden_size"):
        load_transformers_clip_text(tmp_path)
