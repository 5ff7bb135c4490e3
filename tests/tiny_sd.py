"""Tiny random Stable Diffusion components built with diffusers and transformers (the references), saved as a
diffusers folder: the same structure as SD 1.x (cross-attention U-Net, KL autoencoder with 8× downsampling, CLIP
text transformer with the real CLIP vocabulary), at a size that runs in milliseconds. Shared by the tests and
benchmarks/stable_diffusion.py."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_components(seed: int = 0, in_channels: int = 4, scheduler: str = "lms"):
    """(unet, vae, text_encoder, tokenizer, scheduler) of diffusers/transformers with random weights."""
    import diffusers
    import transformers

    from noisecraft.models.tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64, scaling_factor=0.18215)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=2, hidden_act="quick_gelu"))
    with torch.no_grad():   # fresh GroupNorm / LayerNorm weights are 1 and 0, and zero-init convs hide bugs
        for module in (unet, vae, text):
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if scheduler == "lms":
        sched = diffusers.LMSDiscreteScheduler(**schedule, timestep_spacing="trailing")
    elif scheduler == "euler":
        sched = diffusers.EulerDiscreteScheduler(**schedule, timestep_spacing="trailing")
    elif scheduler == "ddim":
        sched = diffusers.DDIMScheduler(**schedule, timestep_spacing="trailing", set_alpha_to_one=True,
                                        clip_sample=False)
    else:
        raise ValueError(scheduler)
    return unet.eval(), vae.eval(), text.eval(), CLIPTokenizer.from_bpe_file(), sched


def save_tiny_pipeline(folder: Path, seed: int = 0, in_channels: int = 4, scheduler: str = "lms"):
    """Write the tiny components as a diffusers StableDiffusionPipeline (or inpainting) folder; return the
    diffusers pipeline object."""
    import diffusers
    import transformers

    unet, vae, text, our_tokenizer, sched = tiny_components(seed, in_channels, scheduler)
    our_tokenizer.save(Path(folder) / "tokenizer_src")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(Path(folder) / "tokenizer_src")
    cls = diffusers.StableDiffusionInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe
