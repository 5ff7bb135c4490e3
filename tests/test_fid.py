"""Tests for the Fréchet distance, the evaluation classifier and the FID-style domain score.

They use a tiny synthetic labelled dataset (bars at class-dependent positions, 16x16) so they need no
downloads and run in a few seconds.
"""

import json

import numpy as np
import pytest
import torch

from noisecraft.errors import NoisecraftError
from noisecraft.evaluation import classifier as clf
from noisecraft.evaluation.classifier import (
    SmallClassifier,
    accuracy,
    classifier_features,
    load_classifier,
    load_or_train_classifier,
    save_classifier,
    train_classifier,
)
from noisecraft.evaluation.fid import (
    domain_fid,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    reference_statistics,
)


class BarsDataset:
    """Stand-in with the `ImageDataset` API: class k is a bright bar (row or column) at a k-dependent place."""

    def __init__(self, n: int, seed: int, size: int = 16, num_classes: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.rand(n, 1, size, size, generator=g) * 0.3 - 1.0
        offset = torch.randint(0, 2, (n,), generator=g)
        for i, (k, o) in enumerate(zip(self.labels.tolist(), offset.tolist())):
            pos = 2 + 3 * (k // 2) + o
            if k % 2 == 0:
                x[i, 0, pos : pos + 2, :] = 1.0
            else:
                x[i, 0, :, pos : pos + 2] = 1.0
        self.images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        self.num_classes = num_classes

    def __len__(self):
        return len(self.images)

    def batch(self, indices):
        return self.images[indices].float() / 127.5 - 1.0, self.labels[indices]


@pytest.fixture(scope="module")
def trained():
    data = BarsDataset(512, seed=0)
    model = train_classifier(data, steps=40, batch_size=32, seed=0)
    return data, model


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 3.0
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-9)
    # symmetric, and a pure mean shift gives the squared distance of the means
    assert frechet_distance(mu2, np.diag(var2), mu1, np.diag(var1)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var1)) == pytest.approx(np.sum((mu1 - mu2) ** 2))


def test_frechet_distance_handles_singular_covariances():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(50, 8))
    features[:, 3] = 0.0  # a dead feature makes both covariances singular
    other = features + rng.normal(scale=0.1, size=features.shape) * (np.arange(8) != 3)
    value = fid_from_features(features, other)
    assert np.isfinite(value) and value >= 0


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(NoisecraftError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(NoisecraftError):
        feature_statistics(np.zeros((1, 5)))


# ---------------------------------------------------------------- classifier


def test_classifier_shapes_and_feature_dims():
    torch.manual_seed(0)
    model = SmallClassifier(in_channels=1, num_classes=10).eval()
    for size in (8, 16, 28):
        x = torch.rand(3, 1, size, size) * 2 - 1
        assert model(x).shape == (3, 10)
        feats = classifier_features(model, x, batch_size=2)
        assert feats.shape == (3, 128) and feats.dtype == np.float64
    rgb = SmallClassifier(in_channels=3, num_classes=5, feature_dim=64).eval()
    assert classifier_features(rgb, torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_classifier_accepts_uint8_and_rejects_bad_input():
    torch.manual_seed(0)
    model = SmallClassifier().eval()
    u8 = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    as_float = u8.float() / 127.5 - 1
    np.testing.assert_allclose(classifier_features(model, u8), classifier_features(model, as_float))
    np.testing.assert_allclose(classifier_features(model, u8.numpy()), classifier_features(model, u8))
    with pytest.raises(NoisecraftError):
        classifier_features(model, torch.zeros(2, 3, 16, 16))  # wrong channel count
    with pytest.raises(NoisecraftError):
        classifier_features(model, torch.zeros(2, 1, 4, 4))  # too small
    with pytest.raises(NoisecraftError):
        classifier_features(model, torch.zeros(16, 16))  # not N x C x H x W


def test_training_learns_the_stand_in_dataset(trained):
    data, model = trained
    assert not model.training
    assert accuracy(model, BarsDataset(256, seed=1)) > 0.9


def test_save_load_round_trip_gives_identical_outputs(trained, tmp_path):
    data, model = trained
    save_classifier(model, tmp_path / "clf", extra={"dataset": "bars"})
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["version"] == clf.CLASSIFIER_VERSION and meta["dataset"] == "bars"
    loaded = load_classifier(tmp_path / "clf")
    x = data.batch(torch.arange(64))[0]
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    np.testing.assert_array_equal(classifier_features(model, x), classifier_features(loaded, x))
    with pytest.raises(NoisecraftError):
        load_classifier(tmp_path / "missing")


def test_load_or_train_classifier_caches(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(name, split, data_dir):
        calls.append((name, split))
        return BarsDataset(128, seed=0 if split == "train" else 1)

    monkeypatch.setattr(clf, "_load_dataset", fake_load_dataset)
    first = load_or_train_classifier("bars", cache_dir=tmp_path, steps=3, progress=False)
    (directory,) = list(tmp_path.iterdir())
    assert "bars" in directory.name and clf.CLASSIFIER_VERSION in directory.name
    assert "test_accuracy" in json.loads((directory / "classifier.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a cached classifier must not be retrained")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    second = load_or_train_classifier("bars", cache_dir=tmp_path, steps=3, progress=False)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    np.testing.assert_array_equal(classifier_features(first, x), classifier_features(second, x))
    assert calls == [("bars", "train"), ("bars", "test")]


def test_cache_key_is_a_safe_folder_name():
    assert clf.cache_key("mnist", steps=300, seed=0) == f"mnist-{clf.CLASSIFIER_VERSION}-s300-seed0"
    a, b = clf.cache_key("folder:/data/cats"), clf.cache_key("folder:/data_cats")
    assert "/" not in a and ":" not in a and a != b


# ---------------------------------------------------------------- domain score


def test_domain_fid_grows_monotonically_with_added_noise(trained):
    _, model = trained
    reference = BarsDataset(400, seed=2)
    samples = BarsDataset(400, seed=3).batch(torch.arange(400))[0]
    ref_stats = reference_statistics(reference, model)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(samples.shape, generator=g)
    scores = [domain_fid((samples + s * noise).clamp(-1, 1), ref_stats, model) for s in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    # precomputed statistics, the dataset itself and uint8 input all give the same number
    as_u8 = ((samples + 1) * 127.5).round().to(torch.uint8)
    assert domain_fid(as_u8, reference, model) == pytest.approx(domain_fid(as_u8, ref_stats, model))
    assert domain_fid(as_u8, reference, model) == pytest.approx(scores[0], rel=1e-3, abs=1e-3)
