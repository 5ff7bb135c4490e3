"""The settings tables (settings.check_fields) and the sizing of models on the meta device (models/size_limits.py)."""

from dataclasses import fields

import pytest

from noisecraft.config import DataConfig, DiffusionConfig, LatentConfig, TextConfig, TrainConfig
from noisecraft.errors import NoisecraftError
from noisecraft.models.clip import CLIPTextConfig, CLIPTextTransformer
from noisecraft.models.unet import UNet, UNetConfig, count_parameters
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.training.vae_trainer import VAETrainConfig

TABLED = [DiffusionConfig, TrainConfig, DataConfig, LatentConfig, TextConfig, UNetConfig, VAEConfig, CLIPTextConfig,
          VAETrainConfig]
CHECKED_BY_HAND = {(UNetConfig, "num_heads")}     # an integer or one per level, checked against the widths


@pytest.mark.parametrize("cls", TABLED, ids=lambda c: c.__name__)
def test_every_field_has_one_row(cls):
    rows = [row[0] for row in cls.RULES]
    assert len(rows) == len(set(rows))
    assert set(rows) | {name for kind, name in CHECKED_BY_HAND if kind is cls} == {f.name for f in fields(cls)}
    cls()                                               # the defaults pass their own table


@pytest.mark.parametrize("cls, bad, message", [
    (TrainConfig, dict(batch_size=0), "train setting batch_size must be a positive integer, got 0."),
    (TrainConfig, dict(steps=2.5), "train setting steps must be a positive integer or None, got 2.5."),
    (TrainConfig, dict(lr=float("nan")), "train setting lr must be a non-negative number, got nan."),
    (TrainConfig, dict(ema_decay=True), "train setting ema_decay must be in [0, 1], got True."),
    (DiffusionConfig, dict(T=1), "diffusion setting T must be an integer in [2, 100000], got 1."),
    (VAETrainConfig, dict(loss="l3"), "VAE training setting loss must be l1 or l2; 'l3' is an unknown loss."),
    (DiffusionConfig, dict(clip_x0=1), "diffusion setting clip_x0 must be true or false, got 1."),
    (DataConfig, dict(image_shape=[1, 0, 4]),
     "data setting image_shape must be three positive integers (C, H, W), got [1, 0, 4]."),
    (TextConfig, dict(dim=10 ** 6), "text setting dim must be a positive integer (at most 65536), got 1000000."),
    (UNetConfig, dict(channel_mults=[]),
     "model setting channel_mults must be positive integers (at least one), got []."),
])
def test_messages_are_one_sentence_from_the_table(cls, bad, message):
    with pytest.raises(NoisecraftError) as info:
        cls(**bad)
    assert str(info.value) == message


def test_lists_become_tuples_and_round_trip():
    config = UNetConfig(channel_mults=[1, 2], attention_levels=[1], num_heads=[2, 4])
    assert (config.channel_mults, config.attention_levels, config.num_heads) == ((1, 2), (1,), (2, 4))
    assert config.to_dict()["channel_mults"] == [1, 2] and UNetConfig.from_dict(config.to_dict()) == config
    data = DataConfig(image_shape=[3, 8, 8])
    assert data.image_shape == (3, 8, 8)


@pytest.mark.parametrize("build, config", [
    (UNet, UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_classes=3)),
    (UNet, UNetConfig(in_channels=4, base_channels=16, channel_mults=(1, 2), attention_levels=(0, 1), context_dim=12,
                      transformer_depth=2, time_conditioning="additive", linear_projection=True)),
    (AutoencoderKL, VAEConfig(block_out_channels=(8, 16), norm_groups=4)),
    (CLIPTextTransformer, CLIPTextConfig(width=16, layers=2, heads=2, max_length=8)),
])
def test_meta_device_count_equals_the_built_model(build, config):
    from noisecraft.models.size_limits import parameter_count
    assert parameter_count(lambda: build(config)) == count_parameters(build(config))
    if isinstance(config, UNetConfig):
        assert config.parameter_count() == count_parameters(build(config))


def test_absurd_sizes_are_refused_before_building():
    with pytest.raises(NoisecraftError, match=r"a U-Net of at least .* parameters, more than the"):
        UNetConfig(base_channels=2 ** 30)
    with pytest.raises(NoisecraftError, match=r"an autoencoder of at least .* parameters"):
        VAEConfig(block_out_channels=(2 ** 20,))
    with pytest.raises(NoisecraftError, match=r"a CLIP text transformer of at least .* parameters"):
        CLIPTextConfig(vocab_size=2 ** 40)
    with pytest.raises(NoisecraftError, match="residual and attention blocks, more than the 500"):
        UNetConfig(channel_mults=(1,) * 12, num_res_blocks=30, attention_levels=())
