"""Tests for sample-quality metrics: FID/KID behaviour, k-NN precision/recall, the classifier report, the FID
Inception network (random weights: the real pytorch-fid weights are not available offline) and the
`train-classifier` command."""

import argparse
import math

import numpy as np
import pytest
import torch

from noisecraft.commands import evaluate
from noisecraft.data.datasets import load_dataset
from noisecraft.errors import NoisecraftError
from noisecraft.evaluation.classifier import SmallClassifier, classifier_features, predict, train_classifier
from noisecraft.evaluation.fid import fid_from_features
from noisecraft.evaluation.inception import FIDInception, inception_features, load_fid_inception
from noisecraft.evaluation.metrics import (
    _polynomial_mmd2,
    classifier_report,
    kid,
    precision_recall,
    sample_quality,
)
from noisecraft.io.checkpoint import save_torch, save_weights


@pytest.fixture(scope="module")
def digits():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = train_classifier(train, steps=40, batch_size=64, seed=0)
    return train, test, model


def _noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 127.5 - 1.0
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


# ---------------------------------------------------------------- FID and KID


def test_domain_fid_and_kid_are_zero_on_the_same_set_and_grow_with_noise(digits):
    train, test, model = digits
    real = classifier_features(model, test.images)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)
    # Other images of the same distribution (the train split): KID is zero within its spread, since it is
    # unbiased for independent samples; then both scores grow with the noise added to those images.
    clean_kid, clean_std = kid(real, classifier_features(model, train.images[:600]), subsets=10, subset_size=250)
    assert abs(clean_kid) < 2 * clean_std
    fids, kids = [], []
    for sigma in (0.2, 0.5, 1.0):
        fake = classifier_features(model, _noisy(train.images[:600], sigma))
        fids.append(fid_from_features(real, fake))
        kids.append(kid(real, fake, subsets=10, subset_size=250)[0])
    assert 0 < fids[0] < fids[1] < fids[2]
    assert clean_kid + 2 * clean_std < kids[0] < kids[1] < kids[2]
    # A set against itself is not two independent samples: the estimate is -O(1/m), tiny next to real gaps.
    assert abs(kid(real, real, subsets=5, subset_size=250)[0]) < 0.1 * kids[1]


def test_kid_is_unbiased_and_matches_the_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    mean, std = kid(a, b, subsets=30, subset_size=250)
    shifted, _ = kid(a, b + 0.5, subsets=30, subset_size=250)
    assert std > 0 and abs(mean) < 2 * std      # same distribution: zero within the spread
    assert shifted > 10 * std
    # With one subset covering each whole set, KID is the unbiased MMD² of eq. 4, summed by hand here.
    x, y = a[:20], b[:20]
    k = lambda u, v: (u @ v / 16 + 1.0) ** 3    # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(20) for j in range(20) if i != j) / (20 * 19)
    yy = sum(k(y[i], y[j]) for i in range(20) for j in range(20) if i != j) / (20 * 19)
    xy = sum(k(x[i], y[j]) for i in range(20) for j in range(20)) / 400
    assert kid(x, y, subsets=3, subset_size=20)[0] == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    assert _polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_kid_rejects_mismatched_features():
    with pytest.raises(NoisecraftError, match="different widths"):
        kid(np.zeros((10, 4)), np.zeros((10, 5)))


# ---------------------------------------------------------------- precision and recall


def test_precision_recall_identical_collapsed_and_far_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8)).astype(np.float32) * 3.0 + 5.0
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0}
    collapsed = np.repeat(real[:1], 400, axis=0)
    pr = precision_recall(real, collapsed, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.02
    far = rng.normal(size=(400, 8)).astype(np.float32) + 100.0
    pr = precision_recall(real, far)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0


def test_precision_recall_by_hand_and_batching():
    # 1-d, k=1: real points 0, 1, 2, 10 have radii 1, 1, 1, 8; fake points 0.5, 3.5, 20, 21 have radii 3, 3, 1, 1.
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [3.5], [20.0], [21.0]])
    # precision: 0.5 (near 0), 3.5 (within 8 of 10) inside; 20, 21 outside. recall: 0, 1, 2 (within 3 of 0.5
    # or 3.5) inside, 10 is 6.5 from 3.5 (radius 3) and 10 from 20 (radius 1): outside.
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 0.75}
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(250, 6)) * 1.3 + 0.2
    assert precision_recall(a, b, k=3, batch_size=7) == precision_recall(a, b, k=3, batch_size=5000)
    with pytest.raises(NoisecraftError, match="k must"):
        precision_recall(a, b, k=300)


# ---------------------------------------------------------------- classifier report


def test_classifier_report_accuracy_histogram_and_entropy(digits):
    _, test, model = digits
    predicted = predict(model, test.images)
    report = classifier_report(model, test.images, labels=predicted)
    assert report["accuracy"] == 1.0
    assert report["class_histogram"] == torch.bincount(predicted, minlength=10).tolist()
    assert sum(report["class_histogram"]) == len(test.images)
    assert 0.0 <= report["entropy"] < math.log(10)
    assert classifier_report(model, test.images, labels=(predicted + 1) % 10)["accuracy"] == 0.0
    assert "accuracy" not in classifier_report(model, test.images[:5])
    with pytest.raises(NoisecraftError, match="labels"):
        classifier_report(model, test.images[:5], labels=[0, 1])

    uniform = SmallClassifier(in_channels=1, num_classes=7)
    torch.nn.init.zeros_(uniform.head.weight)
    torch.nn.init.zeros_(uniform.head.bias)
    report = classifier_report(uniform, test.images[:10])
    assert report["entropy"] == pytest.approx(math.log(7), rel=1e-9)
    assert report["marginal_entropy"] == pytest.approx(math.log(7), rel=1e-9)


def test_sample_quality_reports_everything(digits):
    _, test, model = digits
    good = sample_quality(test.images[:150], test.images[150:], classifier=model, labels=test.labels[:150],
                          kid_subsets=5, kid_subset_size=100)
    bad = sample_quality(_noisy(test.images[:150], 0.8), test.images[150:], classifier=model,
                         labels=test.labels[:150], kid_subsets=5, kid_subset_size=100)
    for key in ("domain_fid", "domain_kid", "domain_kid_std", "precision", "recall", "classifier"):
        assert key in good
    assert "fid" not in good
    assert good["domain_fid"] < bad["domain_fid"] and good["domain_kid"] < bad["domain_kid"]
    assert good["classifier"]["accuracy"] > bad["classifier"]["accuracy"]
    assert good["precision"] > bad["precision"]
    # The report reuses the feature pass; it must equal the stand-alone one.
    stand_alone = classifier_report(model, test.images[:150], labels=test.labels[:150])
    assert good["classifier"]["class_histogram"] == stand_alone["class_histogram"]
    assert good["classifier"]["entropy"] == pytest.approx(stand_alone["entropy"], rel=1e-5)


# ---------------------------------------------------------------- FID Inception

# From pytorch-fid's src/pytorch_fid/inception.py (fid_inception_v3: torchvision's Inception3 with
# aux_logits=False, num_classes=1008 and the FIDInceptionA/C/E_1/E_2 blocks): every BasicConv2d by name.
_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
      "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
PYTORCH_FID_CONVS = (
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    + [f"{m}.{c}" for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for c in _A]
    + [f"Mixed_6a.{c}" for c in _B]
    + [f"{m}.{c}" for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e") for c in _C]
    + [f"Mixed_7a.{c}" for c in _D]
    + [f"{m}.{c}" for m in ("Mixed_7b", "Mixed_7c") for c in _E]
)
PYTORCH_FID_KEYS = {f"{c}.{p}" for c in PYTORCH_FID_CONVS for p in
                    ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                     "bn.num_batches_tracked")} | {"fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    model = FIDInception()
    # Variance-preserving weights and non-trivial BatchNorm statistics, so activations stay O(1) to the end.
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_inception_has_pytorch_fid_names_and_size(inception):
    state = inception.state_dict()
    assert len(PYTORCH_FID_CONVS) == 94 and len(PYTORCH_FID_KEYS) == 566
    assert set(state) == PYTORCH_FID_KEYS
    # torchvision's inception_v3 has 27,161,264 parameters; minus the aux head (3,326,696) and plus the 8 extra
    # classes of the 1008-way fc (16,392) that is the FID network.
    assert sum(p.numel() for p in inception.parameters()) == 27_161_264 - 3_326_696 + 16_392
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    assert inception.Mixed_5b.branch_pool.bn.eps == 0.001


def test_inception_features_of_grey_and_colour_images_of_any_size(inception):
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
    out = inception(grey)
    assert out.shape == (2, 2048) and torch.isfinite(out).all() and out.std() > 1e-3
    torch.testing.assert_close(inception(grey.repeat(1, 3, 1, 1)), out)
    colour = torch.rand(1, 3, 40, 57, generator=g) * 2 - 1
    assert inception(colour).shape == (1, 2048)
    # uint8 input is scaled to [-1, 1] and batched.
    as_uint8 = ((grey + 1) * 127.5).round().to(torch.uint8)
    feats = inception_features(inception, as_uint8, batch_size=1)
    # float32: batches of 1 vs 2 through ~90 layers; pooled features ≤ ~3, near-zero ones carry the absolute
    # error of O(1) activations (~1e-6) → atol 1e-5, rtol 1e-4.
    np.testing.assert_allclose(feats, inception(as_uint8.float() / 127.5 - 1).double().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(NoisecraftError, match="1 or 3 channels"):
        inception(torch.zeros(1, 2, 32, 32))


def test_fid_pooling_differs_from_torchvision(inception):
    """The FID graph: the A/C/E_1 average pools ignore padding, Mixed_7c max-pools."""
    x = torch.rand(1, 1, 3, 3) + 1.0
    from noisecraft.evaluation import inception as module
    corner = module._avg_pool_3x3(x)[0, 0, 0, 0]
    # 4 real pixels, not 9 (4/9 of it); float32 pool vs mean of values in [1, 2): ~2 ulps → rel 1e-6
    assert corner == pytest.approx(float(x[0, 0, :2, :2].mean()), rel=1e-6)
    assert inception.Mixed_7c.pool is module._max_pool_3x3
    assert inception.Mixed_7b.pool is module._avg_pool_3x3


def test_load_fid_inception_round_trips_and_names_wrong_keys(inception, tmp_path):
    pth = tmp_path / "pt_inception.pth"
    state = inception.state_dict()
    # pytorch-fid's file may lack BatchNorm's num_batches_tracked counters; loading must not need them.
    save_torch({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, pth)
    loaded = load_fid_inception(pth)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded(x), inception(x))

    st = tmp_path / "inception.safetensors"
    save_weights(state, st)
    assert all(torch.equal(v, state[k]) for k, v in load_fid_inception(st).state_dict().items())

    save_weights({"Mixed_5b.extra.weight": torch.zeros(2)}, tmp_path / "wrong.safetensors")
    with pytest.raises(NoisecraftError, match=r"missing keys Conv2d_1a_3x3\.bn\.bias.* and \d+ more; unexpected "
                                              r"keys Mixed_5b\.extra\.weight"):
        load_fid_inception(tmp_path / "wrong.safetensors")
    shape = dict(state, **{"fc.bias": torch.zeros(1000)})
    save_torch(shape, tmp_path / "shape.pth")
    with pytest.raises(NoisecraftError, match=r"wrong shape \(fc\.bias \(1000,\) instead of \(1008,\)\)"):
        load_fid_inception(tmp_path / "shape.pth")
    with pytest.raises(NoisecraftError, match="does not exist"):
        load_fid_inception(tmp_path / "absent.pth")


def test_sample_quality_with_inception_adds_fid_and_kid(digits):
    """The plumbing, with a small stand-in for the Inception network (a 2048-d sqrtm would take too long)."""
    _, test, model = digits
    torch.manual_seed(0)
    stand_in = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(16, 8)).eval()
    fake, real = test.images[:100], test.images[100:]
    result = sample_quality(fake, real, classifier=model, inception=stand_in, kid_subsets=3, kid_subset_size=50)
    expected = fid_from_features(inception_features(stand_in, real), inception_features(stand_in, fake))
    assert result["fid"] == pytest.approx(expected) and result["fid"] > 0
    assert result["kid"] == pytest.approx(kid(inception_features(stand_in, real), inception_features(stand_in, fake),
                                              subsets=3, subset_size=50)[0])


# ---------------------------------------------------------------- train-classifier command


def test_train_classifier_command_trains_then_reuses(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="noisecraft")
    evaluate.add_parsers(parser.add_subparsers(dest="command"))
    argv = ["train-classifier", "--dataset", "digits", "--steps", "5", "--out", str(tmp_path), "--quiet"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "digits: test accuracy" in out and "cached the classifier in" in out
    assert str(tmp_path) in out
    assert list(tmp_path.glob("digits-*-s5-seed0/classifier.safetensors"))
    first = out.strip().splitlines()[-1].split("test accuracy ")[1].split("%")[0]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "reused the cached classifier" in out and f"test accuracy {first}%" in out
    with pytest.raises(NoisecraftError, match="--steps"):
        args = parser.parse_args(argv[:4] + ["0"] + argv[5:])
        args.func(args)
