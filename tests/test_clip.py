"""CLIP: the text transformer (shapes, causal mask, parity with transformers), the contrastive loss, saving and
loading the text encoder, and a tiny training run on scikit-learn digits."""

import argparse
import csv
import math

import pytest
import torch

from noisecraft.data.captions import captions_for
from noisecraft.data.datasets import load_dataset
from noisecraft.errors import NoisecraftError
from noisecraft.io.checkpoint import load_json
from noisecraft.models.clip import (
    LOGIT_SCALE_INIT,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPTextTransformer,
    contrastive_loss,
    strip_text_model_prefix,
)
from noisecraft.models.text_encoders import load_text_encoder
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.training import clip_trainer
from noisecraft.training.clip_trainer import load_clip, train_clip
from noisecraft.training.loop import TrainingDiverged

PROMPTS = ["a photo of an astronaut riding a horse on the moon, a detailed oil painting by an old master", "the number 7", ""]
TINY = dict(width=32, layers=2, heads=4)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


def tiny_transformer(seed=0, **overrides):
    torch.manual_seed(seed)
    return CLIPTextTransformer(CLIPTextConfig(**{**TINY, **overrides}))


def test_shapes_and_gradients(tokenizer):
    model = tiny_transformer(max_length=16)
    ids = tokenizer(PROMPTS, max_length=16)
    hidden, pooled = model(ids)
    assert hidden.shape == (3, 16, 32) and pooled.shape == (3, 32)
    (hidden.square().mean() + pooled.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_causal_mask(tokenizer):
    """Changing token 5 leaves positions 0..4 unchanged and changes position 5 onwards."""
    model = tiny_transformer().eval()
    ids = tokenizer(["a photo of a small cat on a mat"], max_length=16)
    other = ids.clone()
    other[0, 5] = 1234
    with torch.no_grad():
        a, b = model(ids)[0], model(other)[0]
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().amax(dim=-1).min() > 1e-4


def test_pooling_at_first_end_token(tokenizer):
    model = tiny_transformer().eval()
    ids = tokenizer(PROMPTS, max_length=16)
    ids = torch.cat([ids, torch.full((1, 16), 320)])   # a hand-made row without any end token
    with torch.no_grad():
        hidden, pooled = model(ids)
    first_eos = [row.tolist().index(tokenizer.eos_id) for row in ids[:3]]
    assert first_eos == [15, 4, 1]   # the long prompt is truncated, its end token kept
    for i, pos in enumerate(first_eos + [15]):
        torch.testing.assert_close(pooled[i], hidden[i, pos])


@pytest.mark.parametrize("eos_token_id", [49407, 2])
def test_parity_with_transformers(tokenizer, eos_token_id):
    """Random tiny CLIPTextModel -> our transformer: same hidden states and pooled output on real token ids, both
    for modern configs (first eos) and legacy ones (eos_token_id = 2: transformers takes argmax(ids))."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77,
                                         eos_token_id=eos_token_id)
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(config).eval()
    ours = CLIPTextTransformer(CLIPTextConfig(width=32, intermediate_size=37, layers=2, heads=4)).eval()
    ours.load_state_dict(strip_text_model_prefix(reference.state_dict()))
    ids = tokenizer(PROMPTS)   # 77 tokens, padded with <|endoftext|>
    with torch.no_grad():
        expected = reference(input_ids=ids)
        hidden, pooled = ours(ids)
    # float32, transformers' kernels vs ours: outputs after the final LayerNorm are ≤ ~4 (ulp 4.8e-7), two layers of
    # width-32 sums → a few ulps; atol 1e-5 (exact here), far below the O(1) outputs.
    torch.testing.assert_close(hidden, expected.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=0, atol=1e-5)


def test_text_encoder_matches_transformers_with_projection(tokenizer):
    """CLIPTextEncoder's state dict is CLIPTextModelWithProjection's; pooled = its text_embeds."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, projection_dim=24)
    torch.manual_seed(1)
    reference = transformers.CLIPTextModelWithProjection(config).eval()
    ours = CLIPTextEncoder(CLIPTextConfig(**TINY, projection_dim=24), tokenizer).eval()
    ours.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected = reference(input_ids=tokenizer(PROMPTS))
        hidden, pooled = ours(PROMPTS)
    # float32, other kernels: values ≤ ~4 after LayerNorm and projection, a few ulps apart → atol 1e-5 (exact here)
    torch.testing.assert_close(hidden, expected.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, expected.text_embeds, rtol=0, atol=1e-5)
    # The layout Stable Diffusion files use: "text_model." prefixes and a position_ids buffer.
    state = {"text_model." + k: v for k, v in ours.text_model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert set(strip_text_model_prefix(state)) == set(ours.text_model.state_dict())


def test_config_validation_and_round_trip():
    config = CLIPTextConfig(**TINY, max_length=16)
    assert config.intermediate_size == 128 and config.eos_token_id == 49407
    assert CLIPTextConfig.from_dict(config.to_dict()) == config
    with pytest.raises(NoisecraftError, match="unknown CLIP text settings"):
        CLIPTextConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(NoisecraftError, match="divisible"):
        CLIPTextConfig(width=30, heads=4)
    with pytest.raises(NoisecraftError, match="activation"):
        CLIPTextConfig(activation="relu")
    with pytest.raises(NoisecraftError, match="positions"):
        tiny_transformer(max_length=8)(torch.zeros(1, 9, dtype=torch.long))


def test_contrastive_loss_aligned_beats_shuffled():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 8, generator=g)
    scale = torch.tensor(LOGIT_SCALE_INIT)
    aligned = contrastive_loss(emb, emb, scale)
    shuffled = contrastive_loss(emb, emb[torch.randperm(16, generator=g)], scale)
    assert aligned < shuffled
    # Distinct caption ids are the plain diagonal loss; the logit scale is clipped at ln 100.
    # float32, soft-target vs class-index cross-entropy over logits ≤ 1/0.07 ≈ 14 (ulp 9.5e-7) → atol 1e-5
    torch.testing.assert_close(contrastive_loss(emb, emb, scale, torch.arange(16)), aligned, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(contrastive_loss(emb, emb, 10.0), contrastive_loss(emb, emb, math.log(100)))


def test_contrastive_loss_duplicate_captions():
    """Pairs with equal ids are all positives, each row's target uniform over them, in both directions."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.tensor([3, 3, 1, 3, 0, 1])
    loss = contrastive_loss(image, text, 0.5, ids)
    logits = math.exp(0.5) * torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    same = (ids[:, None] == ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    per_direction = [-(targets * m.log_softmax(dim=1)).sum(dim=1).mean() for m in (logits, logits.T)]
    # float32, F.cross_entropy vs log_softmax by hand: a loss ≈ 2 from 6-term sums → atol 1e-6 (~4 ulps of 2)
    torch.testing.assert_close(loss, sum(per_direction) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(loss, contrastive_loss(image, text, 0.5))   # the ids matter for differing texts
    # Identical captions embed identically; then the ids change neither the loss nor its gradient.
    unique = torch.randn(4, 4, generator=g, requires_grad=True)
    with_ids = contrastive_loss(image, unique[ids], 0.5, ids)
    without = contrastive_loss(image, unique[ids], 0.5)
    # float32, soft vs hard targets: loss ≈ 2, gradients ≤ ~0.2, a few ulps apart → atol 1e-6
    torch.testing.assert_close(with_ids, without, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(with_ids, unique)[0], torch.autograd.grad(without, unique)[0],
                               rtol=1e-5, atol=1e-6)


def test_clip_model_shapes():
    torch.manual_seed(0)
    model = CLIPModel(CLIPTextConfig(**TINY, max_length=16), image_channels=1, image_size=16, embed_dim=12,
                      image_widths=(8, 16))
    image_emb = model.encode_image(torch.randn(4, 1, 16, 16))
    text_emb = model.encode_text(torch.randint(0, 49406, (4, 16)))
    assert image_emb.shape == text_emb.shape == (4, 12)
    torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(4), rtol=0, atol=1e-6)   # float32: ~1 ulp of 1
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)   # float32 rounding ≤ 6e-8
    contrastive_loss(image_emb, text_emb, model.logit_scale).backward()
    assert model.logit_scale.grad is not None and model.image_encoder.net[0].weight.grad.abs().sum() > 0
    with pytest.raises(NoisecraftError, match="channel"):
        model.encode_image(torch.randn(2, 3, 16, 16))
    assert CLIPModel.from_config_dict(model.config_dict()).config_dict() == model.config_dict()


def test_text_encoder_save_load(tmp_path, tokenizer):
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(CLIPTextConfig(**TINY, max_length=16, projection_dim=8)).eval()
    encoder.save(tmp_path / "te")
    assert load_json(tmp_path / "te" / "text_encoder.json")["kind"] == "clip"
    loaded = load_text_encoder(tmp_path / "te")
    assert isinstance(loaded, CLIPTextEncoder)
    assert (loaded.dim, loaded.pooled_dim, loaded.max_length) == (32, 8, 16)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        for a, b in zip(encoder(PROMPTS), loaded(PROMPTS)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def tiny_run(dataset, out, **kwargs):
    options = dict(steps=3, batch_size=32, text_config=CLIPTextConfig(**TINY, max_length=16), embed_dim=16,
                   image_widths=(8, 16), progress=False, log_every=1)
    return train_clip(dataset, captions_for(dataset), out, **{**options, **kwargs})


def test_train_clip_writes_a_loadable_text_encoder(tmp_path, digits):
    train, test = digits
    summary = tiny_run(train, tmp_path / "clip", test_dataset=test)
    assert summary["steps"] == 3 and math.isfinite(summary["loss"])
    assert 0.0 <= summary["zero_shot_accuracy"] <= 1.0
    config = load_json(tmp_path / "clip" / "config.json")
    assert config["kind"] == "clip" and config["step"] == 3
    assert config["metrics"]["zero_shot_accuracy"] == summary["zero_shot_accuracy"]
    with open(tmp_path / "clip" / "log.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2", "3"]

    encoder = load_text_encoder(summary["text_encoder"])
    with torch.no_grad():
        tokens, pooled = encoder(["a handwritten digit seven", "the number 3"])
    assert tokens.shape == (2, 16, 32) and pooled.shape == (2, 16)
    # The saved text tower is the one inside the saved CLIP model.
    model, tok = load_clip(tmp_path / "clip")
    with torch.no_grad():
        expected = model.text_projection(model.text_model(tok(["the number 3"]))[1])
    torch.testing.assert_close(pooled[1:], expected, rtol=1e-5, atol=1e-5)   # float32: batch of 2 vs 1, values ≤ ~3


def test_train_clip_nan_keeps_last_checkpoint(tmp_path, digits, monkeypatch):
    calls = []

    def failing_loss(*args):
        calls.append(1)
        loss = contrastive_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(clip_trainer, "contrastive_loss", failing_loss)
    with pytest.raises(TrainingDiverged, match=r"at step 3; the last good checkpoint \(step 2\)"):
        tiny_run(digits[0], tmp_path / "clip", steps=5, checkpoint_every=2)
    assert load_json(tmp_path / "clip" / "config.json")["step"] == 2
    assert isinstance(load_text_encoder(tmp_path / "clip" / "text_encoder"), CLIPTextEncoder)


def test_train_clip_needs_a_budget(tmp_path, digits):
    with pytest.raises(NoisecraftError, match="budget"):
        tiny_run(digits[0], tmp_path / "clip", steps=None)


def test_train_clip_command(tmp_path, capsys):
    from noisecraft.commands import clip as clip_command

    parser = argparse.ArgumentParser()
    clip_command.add_parsers(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    args = parser.parse_args(["train-clip", "--dataset", "digits", "--steps", "2", "--batch-size", "16",
                              "--width", "32", "--layers", "1", "--heads", "2", "--embed-dim", "16",
                              "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "zero-shot accuracy on the 297 test images" in printed and str(out / "text_encoder") in printed
    assert (out / "text_encoder" / "model.safetensors").exists() and (out / "clip.safetensors").exists()
    with pytest.raises(NoisecraftError, match="already holds"):
        args.func(args)
