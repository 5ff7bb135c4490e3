"""Tests for noisecraft.models.unet: shapes, gradient flow, conditioning, clear errors, config validation.

All models here are tiny (a few tens of thousands of weights) so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import pytest
import torch

from noisecraft.errors import NoisecraftError
from noisecraft.models.embeddings import timestep_embedding
from noisecraft.models.unet import UNet, UNetConfig, count_parameters


def tiny(**overrides) -> UNetConfig:
    settings = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                    attention_levels=(1,), head_dim=8, groups=4, dropout=0.0)
    settings.update(overrides)
    return UNetConfig(**settings)


def build(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return UNet(tiny(**overrides))


@torch.no_grad()
def perturb(model: UNet, seed: int = 1, scale: float = 0.1) -> UNet:
    """Give every weight a random nudge, so zero-initialised layers no longer hide the inputs."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def noisy(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("channels, size, mults, attention", [
    (1, 16, (1, 2), (1,)),
    (1, 28, (1, 2, 2), (2,)),      # MNIST: 28 -> 14 -> 7
    (3, 32, (1, 2), (1,)),         # RGB
    (3, 32, (1, 2, 2), (1, 2)),
])
def test_output_shape_equals_input_shape(channels, size, mults, attention):
    model = perturb(build(in_channels=channels, channel_mults=mults, attention_levels=attention))
    x = noisy((2, channels, size, size))
    out = model(x, torch.tensor([3.0, 700.0]))
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_out_channels_can_differ_from_in_channels():
    model = build(in_channels=3, out_channels=6)
    assert model(noisy((1, 3, 16, 16)), torch.tensor([1.0])).shape == (1, 6, 16, 16)


def test_scalar_and_fractional_timesteps():
    model = perturb(build())
    x = noisy((3, 1, 16, 16))
    a = model(x, torch.tensor(250.0))                 # 0-d t is broadcast over the batch
    b = model(x, torch.full((3,), 250.0))
    torch.testing.assert_close(a, b)
    c = model(x, torch.full((3,), 250.5))             # fractional t is allowed (continuous-time samplers)
    assert not torch.equal(b, c)


def test_fresh_model_outputs_zero():
    # The output convolution starts at zero, so an untrained network predicts exactly 0.
    model = build()
    out = model(noisy((2, 1, 16, 16)), torch.tensor([10.0, 20.0]))
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- gradients


def test_gradients_reach_every_parameter_after_two_steps():
    model = build(num_classes=3, dropout=0.1).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = noisy((8, 1, 16, 16), seed=1), noisy((8, 1, 16, 16), seed=2)
    t = torch.linspace(0, 999, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])   # 3 is the null label: every row of the table is used
    for _ in range(2):
        opt.zero_grad()
        (model(x, t, labels) - target).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    (model(x, t, labels) - target).pow(2).mean().backward()

    named = dict(model.named_parameters())
    missing = [n for n, p in named.items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in named.values())
    silent = [n for n, p in named.items() if not p.grad.abs().sum() > 0]
    assert not silent, f"zero gradient for {silent}"


def test_zero_init_layers_get_gradient_on_first_step():
    # Even before any update the zero-initialised output layer learns (its input is non-zero).
    model = build()
    (model(noisy((2, 1, 16, 16)), torch.tensor([5.0, 500.0])) - 1).pow(2).mean().backward()
    assert model.conv_out.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- conditioning


def test_labels_change_the_output_once_weights_are_nonzero():
    model = perturb(build(num_classes=10))
    x = noisy((1, 1, 16, 16)).expand(4, -1, -1, -1)
    t = torch.full((4,), 300.0)
    with torch.no_grad():
        out = model(x, t, torch.tensor([0, 3, 7, 10]))   # 10 is the null label
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j]), (i, j)


def test_null_label_equals_labels_none():
    model = perturb(build(num_classes=5))
    x, t = noisy((2, 1, 16, 16)), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        by_none = model(x, t, None)
        by_null = model(x, t, torch.tensor([5, 5]))
        by_label = model(x, t, torch.tensor([1, 1]))
    assert model.label_embed.null_label == 5
    torch.testing.assert_close(by_none, by_null)
    assert not torch.allclose(by_none, by_label)


def test_unconditional_model_has_no_label_table():
    model = build()
    assert model.label_embed is None
    assert not any("label" in name for name, _ in model.named_parameters())
    # labels=None is the normal call; a conditional model also accepts it (the unconditional branch).
    assert model(noisy((1, 1, 16, 16)), torch.tensor([1.0]), None).shape == (1, 1, 16, 16)


# ---------------------------------------------------------------- time embedding


def test_timestep_embedding_differs_for_different_t():
    t = torch.tensor([0.0, 1.0, 2.0, 500.0, 999.0])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (5, 32)
    for i in range(5):
        for j in range(i + 1, 5):
            assert (emb[i] - emb[j]).abs().max() > 1e-3, (i, j)
    assert torch.equal(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))   # cos 0 = 1, sin 0 = 0


def test_timestep_embedding_odd_dimension_is_padded():
    emb = timestep_embedding(torch.tensor([3.0, 4.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[:, -1], torch.zeros(2))


def test_model_time_embedding_and_output_depend_on_t():
    model = perturb(build())
    with torch.no_grad():
        e = model.time_embed(torch.tensor([10.0, 11.0, 900.0]))
        assert not torch.allclose(e[0], e[1]) and not torch.allclose(e[0], e[2])
        x = noisy((1, 1, 16, 16)).expand(2, -1, -1, -1)
        out = model(x, torch.tensor([10.0, 900.0]))
    assert not torch.allclose(out[0], out[1])


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("size", [(30, 30), (32, 30), (15, 9)])
def test_size_not_divisible_by_downsample_factor_comes_back_whole(size):
    # Stable Diffusion takes any multiple of 8 (latents 60 -> 30 -> 15 -> 8): each Upsample meets its skip's size.
    model = perturb(build(channel_mults=(1, 2, 2), attention_levels=(2,)))
    assert model.config.downsample_factor == 4
    x = noisy((2, 1, *size))
    out = model(x, torch.tensor([1.0, 500.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_wrong_channel_count_is_a_clear_error():
    model = build(in_channels=1)
    with pytest.raises(NoisecraftError, match=r"N×1×H×W, got \(2, 3, 16, 16\)"):
        model(noisy((2, 3, 16, 16)), torch.tensor([1.0, 2.0]))
    with pytest.raises(NoisecraftError, match="N×1×H×W"):
        model(noisy((1, 16, 16)), torch.tensor([1.0]))        # no batch dimension


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("bad, pattern", [
    (dict(base_channels=-8), "base_channels must be a positive integer"),
    (dict(base_channels=0), "base_channels must be a positive integer"),
    (dict(num_res_blocks=-1), "num_res_blocks must be a positive integer"),
    (dict(in_channels=0), "in_channels must be a positive integer"),
    (dict(head_dim=2.5), "head_dim must be a positive integer"),
    (dict(groups=0), "groups must be a positive integer"),
    (dict(channel_mults=()), "channel_mults must be positive integers"),
    (dict(channel_mults=(1, -2)), "channel_mults must be positive integers"),
    (dict(groups=3), "divisible by groups=3"),
    (dict(attention_levels=(2,)), "attention_levels"),
    (dict(attention_levels=(-1,)), "attention_levels"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(dropout=-0.1), "dropout must be in"),
    (dict(num_classes=-1), "num_classes must be a non-negative integer"),
])
def test_config_validation(bad, pattern):
    with pytest.raises(NoisecraftError, match=pattern):
        tiny(**bad)


def test_config_from_dict_rejects_unknown_keys():
    data = tiny().to_dict()
    data["chanel_mults"] = [1, 2]     # a typo must not be silently ignored
    with pytest.raises(NoisecraftError, match=r"unknown model settings \['chanel_mults'\]"):
        UNetConfig.from_dict(data)


def test_config_round_trip_through_dict():
    config = tiny(num_classes=10, channel_mults=(1, 2, 2), attention_levels=(1, 2))
    data = config.to_dict()
    assert data["channel_mults"] == [1, 2, 2] and data["out_channels"] == 1
    again = UNetConfig.from_dict(data)
    assert again == config
    assert again.channel_mults == (1, 2, 2) and isinstance(again.attention_levels, tuple)


def test_same_seed_same_weights_and_parameter_count():
    a, b = build(seed=3), build(seed=3)
    assert count_parameters(a) == count_parameters(b) > 0
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- text conditioning (cross-attention)


def text_model(seed: int = 0, **overrides) -> UNet:
    settings = dict(in_channels=4, context_dim=12, attention_levels=(1,))
    settings.update(overrides)
    return perturb(build(seed, **settings))


def test_text_model_uses_spatial_transformers_everywhere_attention_is():
    from noisecraft.models.transformer import SpatialTransformer
    model = build(in_channels=4, context_dim=12, channel_mults=(1, 2), attention_levels=(0, 1))
    attentions = [a for side in (model.down, model.up) for level in side for a in level.attentions]
    assert attentions and all(isinstance(a, SpatialTransformer) for a in attentions)
    assert isinstance(model.mid_attn, SpatialTransformer)
    assert model.mid_attn.transformer_blocks[0].attn2.to_k.in_features == 12
    assert not any("qkv" in name for name, _ in model.named_parameters())


def test_text_model_shapes_and_gradients_reach_every_parameter_and_the_context():
    model = text_model().train()
    x, t = noisy((2, 4, 8, 8)), torch.tensor([3.0, 700.0])
    context = noisy((2, 5, 12), seed=1).requires_grad_()
    out = model(x, t, context)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0     # the text steers the output
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"no gradient for {silent}"


def test_different_contexts_give_different_outputs_and_same_context_the_same():
    model = text_model()
    x = noisy((1, 4, 8, 8)).expand(3, -1, -1, -1)
    a, b = noisy((1, 5, 12), seed=1), noisy((1, 5, 12), seed=2)
    with torch.no_grad():
        out = model(x, torch.full((3,), 400.0), torch.cat([a, b, a]))
    assert not torch.allclose(out[0], out[1])
    # float32: rows 0 and 2 of one batch may fall in different GEMM blocks; outputs ≤ ~2 → atol 1e-5
    torch.testing.assert_close(out[0], out[2], rtol=1e-5, atol=1e-5)
    # A context of another length (more tokens) is fine: attention pools over tokens.
    assert model(x, torch.full((3,), 1.0), noisy((3, 9, 12))).shape == x.shape


def test_fresh_text_model_outputs_zero():
    model = build(in_channels=4, context_dim=12)
    out = model(noisy((2, 4, 8, 8)), torch.tensor([1.0, 2.0]), noisy((2, 3, 12)))
    assert torch.equal(out, torch.zeros_like(out))


def test_transformer_depth_two():
    one, two = build(in_channels=4, context_dim=12), build(in_channels=4, context_dim=12, transformer_depth=2)
    assert len(two.mid_attn.transformer_blocks) == 2 and len(one.mid_attn.transformer_blocks) == 1
    assert count_parameters(two) > count_parameters(one)
    two = perturb(two)
    x = noisy((2, 4, 8, 8))
    assert torch.isfinite(two(x, torch.tensor([1.0, 2.0]), noisy((2, 3, 12)))).all()


def test_text_model_context_errors():
    model = build(in_channels=4, context_dim=12)
    x, t = noisy((2, 4, 8, 8)), torch.tensor([1.0, 2.0])
    with pytest.raises(NoisecraftError, match="needs cond.*empty prompt"):
        model(x, t)
    with pytest.raises(NoisecraftError, match=r"2×L×12.*got \(2, 5, 16\)"):
        model(x, t, noisy((2, 5, 16)))                          # wrong width
    with pytest.raises(NoisecraftError, match=r"got \(3, 5, 12\)"):
        model(x, t, noisy((3, 5, 12)))                          # wrong batch size
    with pytest.raises(NoisecraftError, match=r"got \(2,\)"):
        model(x, t, torch.tensor([1, 2]))                       # class labels given to a text model


@pytest.mark.parametrize("bad, pattern", [
    (dict(context_dim=0), "context_dim must be a positive integer or None"),
    (dict(context_dim=7.5), "context_dim must be a positive integer or None"),
    (dict(context_dim=8, transformer_depth=0), "transformer_depth must be a positive integer"),
    (dict(context_dim=8, num_classes=10), "class labels.*or text.*not both"),
])
def test_text_config_validation(bad, pattern):
    with pytest.raises(NoisecraftError, match=pattern):
        tiny(**bad)


def test_text_config_round_trip_and_old_configs_still_load():
    config = tiny(in_channels=4, context_dim=768, transformer_depth=2)
    data = config.to_dict()
    assert data["context_dim"] == 768 and data["transformer_depth"] == 2
    assert UNetConfig.from_dict(data) == config
    old = tiny(num_classes=10).to_dict()
    del old["context_dim"], old["transformer_depth"]            # a config.json written before text models
    again = UNetConfig.from_dict(old)
    assert again.context_dim is None and again.transformer_depth == 1 and again == tiny(num_classes=10)


def test_class_model_takes_labels_through_cond():
    model = perturb(build(num_classes=5))
    x, t = noisy((2, 1, 16, 16)), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond=torch.tensor([1, 2])), model(x, t, torch.tensor([1, 2])))
        soft = torch.nn.functional.one_hot(torch.tensor([1, 2]), 6).float()   # soft weights still work
        # float32: one-hot weights times the embedding table vs a lookup; outputs ≤ ~2 → atol 1e-5
        torch.testing.assert_close(model(x, t, soft), model(x, t, torch.tensor([1, 2])), atol=1e-5, rtol=1e-5)
