"""Tests for noisecraft.models.transformer and the general Attention: parity with diffusers' Transformer2DModel
(loaded by name, strict), identity at init, self- vs cross-attention, the key layout."""

from __future__ import annotations

import pytest
import torch

from noisecraft.models.attention import Attention
from noisecraft.models.transformer import SpatialTransformer


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(module, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


@pytest.mark.parametrize("linear", [False, True], ids=["conv-proj", "linear-proj"])
@pytest.mark.parametrize("depth", [1, 2])
def test_matches_diffusers_transformer2d_after_loading_its_state_dict(linear, depth):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                       cross_attention_dim=24, norm_num_groups=8, num_layers=depth,
                                       use_linear_projection=linear)
    perturb(ref)   # diffusers zero-initialises nothing here, but random norms/biases test more of the wiring
    ours = SpatialTransformer(32, heads=2, head_dim=16, context_dim=24, depth=depth, groups=8,
                              use_linear_projection=linear).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)   # same key names and shapes

    x, context = randn(2, 32, 6, 5, seed=2), randn(2, 7, 24, seed=3)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context).sample
        got = ours(x, context)
        got_nhwc = ours(x.contiguous(memory_format=torch.channels_last), context)
    assert (expected - x).abs().max() > 0.1                      # the block does something
    # float32, diffusers' kernels (and channels-last ones) vs ours: outputs ≤ ~7 (ulp 4.8e-7), 2e-6 seen → atol 1e-5
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_nhwc, expected, atol=1e-5, rtol=0)


def test_state_dict_keys_follow_the_diffusers_layout():
    keys = set(SpatialTransformer(16, 2, 8, context_dim=12, depth=2, groups=4).state_dict())
    for i in (0, 1):
        block = f"transformer_blocks.{i}"
        for name in ("norm1", "norm2", "norm3"):
            assert {f"{block}.{name}.weight", f"{block}.{name}.bias"} <= keys
        for attn in ("attn1", "attn2"):
            assert {f"{block}.{attn}.to_{p}.weight" for p in "qkv"} <= keys
            assert f"{block}.{attn}.to_q.bias" not in keys                    # Q, K, V are bias-free
            assert {f"{block}.{attn}.to_out.0.weight", f"{block}.{attn}.to_out.0.bias"} <= keys
        assert {f"{block}.ff.net.0.proj.weight", f"{block}.ff.net.2.weight"} <= keys
    assert {"norm.weight", "proj_in.weight", "proj_out.weight", "proj_out.bias"} <= keys
    assert "transformer_blocks.2.norm1.weight" not in keys


def test_fresh_block_is_the_identity_and_proj_out_still_learns():
    block = SpatialTransformer(16, 2, 8, context_dim=12, groups=4)
    x, context = randn(2, 16, 4, 4), randn(2, 3, 12, seed=1)
    out = block(x, context)
    assert torch.equal(out, x)
    out.square().sum().backward()
    assert block.proj_out.weight.grad.abs().sum() > 0


def test_context_changes_the_output_and_receives_gradient():
    block = perturb(SpatialTransformer(16, 2, 8, context_dim=12, groups=4))
    x = randn(1, 16, 4, 4)
    context = randn(2, 3, 12, seed=1).requires_grad_()
    out = block(x.expand(2, -1, -1, -1), context)
    assert not torch.allclose(out[0], out[1])
    out.sum().backward()
    assert context.grad.abs().sum() > 0


def test_without_context_dim_there_is_no_cross_attention():
    block = SpatialTransformer(16, 2, 8, context_dim=None, groups=4)
    assert block.transformer_blocks[0].attn2 is None
    assert not any("attn2" in k or "norm2" in k for k in block.state_dict())
    assert perturb(block)(randn(1, 16, 4, 4)).shape == (1, 16, 4, 4)


def test_attention_self_and_cross_shapes_and_definition():
    attn = perturb(Attention(query_dim=10, context_dim=6, heads=2, head_dim=4))
    x, context = randn(3, 5, 10), randn(3, 7, 6, seed=1)
    out = attn(x, context)
    assert out.shape == (3, 5, 10)
    # softmax(QKᵀ/√d)V per head, written out.
    q, k, v = (m.view(3, -1, 2, 4).transpose(1, 2) for m in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)   # float32: SDPA vs by hand, values ≤ ~0.5
    # Token order of the context does not matter to cross-attention (no positions there).
    torch.testing.assert_close(attn(x, context.flip(1)), out, atol=1e-5, rtol=1e-5)   # float32: sums reordered

    self_attn = Attention(query_dim=10, heads=2, head_dim=4)
    assert self_attn.to_k.in_features == 10 and self_attn(x).shape == (3, 5, 10)
