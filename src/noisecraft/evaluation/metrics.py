"""Sample-quality metrics on feature vectors: KID, k-NN precision/recall, and a classifier's report.

- KID (Bińkowski et al., 2018, "Demystifying MMD GANs", eq. 4 and Sec. 4): the unbiased estimate of the
  squared maximum mean discrepancy with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over
  random subsets. Unlike FID it has an unbiased estimator, so small sample sets compare fairly; it can be
  slightly negative when the two sets come from the same distribution.
- Precision and recall (Kynkäänniemi et al., 2019, "Improved Precision and Recall Metric", eq. 1-3): each set
  defines a manifold as the union of balls around its points, each ball reaching to the point's k-th nearest
  neighbour in its own set. Precision is the share of generated points inside the real manifold (fidelity),
  recall the share of real points inside the generated one (coverage).
- The classifier report: how often a conditional model's samples are recognised as their class, how sure the
  classifier is (mean predicted-class entropy) and how the predicted classes are spread.

`sample_quality` computes them all, with the FID-style domain score of `noisecraft.evaluation.fid` and,
given the FID Inception network, standard FID and KID. Features are computed once per image set.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import NoisecraftError
from .classifier import SmallClassifier, classifier_features, map_batches
from .fid import fid_from_features


def _as_features(features, name: str, dtype=np.float64) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=dtype)
    if features.ndim != 2 or features.shape[0] < 2:
        raise NoisecraftError(f"{name} must be an N x D array with N >= 2, got shape {features.shape}; "
                              f"pass more images.")
    return features


def _check_same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise NoisecraftError(f"The two feature sets have different widths ({a.shape[1]} and {b.shape[1]}); "
                              f"compute both with the same network.")


# --------------------------------------------------------------------------------------------------
# KID


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between equal-sized samples x, y (m x d) with k(a, b) = (aᵀb / d + 1)³.

    MMD²_u = 1/(m(m-1)) Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m² Σ_{i,j} k(x_i, y_j)
    (the diagonals k(x_i, x_i) are left out of the within-set sums, which makes the estimate unbiased).
    """
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased polynomial-kernel MMD² over random subsets.

    Each of `subsets` rounds draws `subset_size` rows (without replacement) from each set and computes
    `_polynomial_mmd2`; sets smaller than `subset_size` use their common size. The std is the spread of
    the subset estimates (as torch-fidelity and the paper report it). Features of any network work;
    with FID-Inception pool features this is the KID of the literature. `seed` fixes the subsets.
    """
    x = _as_features(features1, "features1")
    y = _as_features(features2, "features2")
    _check_same_dim(x, y)
    if subsets < 1 or subset_size < 2:
        raise NoisecraftError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}.")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    estimates = [
        _polynomial_mmd2(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(estimates)), float(np.std(estimates))


# --------------------------------------------------------------------------------------------------
# precision and recall


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|² for a block of rows a, via |a|² + |b|² - 2 aᵀb (clamped: round-off can go below 0)."""
    return ((a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_(min=0.0)


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance from each row of x to its k-th nearest other row."""
    x_sq = (x * x).sum(1)
    radii = []
    for start in range(0, len(x), batch_size):
        d2 = _squared_distances(x[start:start + batch_size], x, x_sq)
        # The point itself sits at distance 0 and is the first of the k + 1 smallest.
        radii.append(d2.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """For each point: is it inside at least one ball B(centre_j, radius_j)? (eq. 1 of Kynkäänniemi et al.)"""
    c_sq = (centres * centres).sum(1)
    inside = []
    for start in range(0, len(points), batch_size):
        d2 = _squared_distances(points[start:start + batch_size], centres, c_sq)
        inside.append((d2 <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1000) -> dict:
    """k-NN precision and recall of generated features against real ones (Kynkäänniemi et al., 2019).

    precision = share of fake points within the k-NN ball of some real point;
    recall    = share of real points within the k-NN ball of some fake point.
    Distances are computed in float32, `batch_size` rows at a time (10k x 10k fits easily in CPU memory).
    Both sets are centred on the real mean first, which keeps the float32 round-off of |a|² + |b|² - 2aᵀb small.
    The paper uses k = 3.
    """
    real = _as_features(real_features, "real_features", np.float32)
    fake = _as_features(fake_features, "fake_features", np.float32)
    _check_same_dim(real, fake)
    if not 1 <= k < min(len(real), len(fake)):
        raise NoisecraftError(f"k must be at least 1 and below the size of both sets ({len(real)} real, "
                              f"{len(fake)} fake), got k={k}.")
    centre = real.mean(axis=0, keepdims=True)
    real_t, fake_t = torch.from_numpy(real - centre), torch.from_numpy(fake - centre)
    precision = _inside_manifold(fake_t, real_t, _knn_radii(real_t, k, batch_size), batch_size)
    recall = _inside_manifold(real_t, fake_t, _knn_radii(fake_t, k, batch_size), batch_size)
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}


# --------------------------------------------------------------------------------------------------
# classifier report


def _report_from_logits(logits: torch.Tensor, labels=None) -> dict:
    logits = logits.double()
    num_classes = logits.shape[1]
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    predicted = logits.argmax(dim=1)
    # H(p(y|x)) = -Σ_y p log p per sample, in nats; 0 for a sure prediction, log K for a uniform one.
    entropy = -(p * log_p).sum(dim=1)
    marginal = p.mean(dim=0)
    report = {
        "n": int(len(logits)),
        "entropy": float(entropy.mean()),
        # Entropy of the average prediction: log K when every class is equally represented.
        "marginal_entropy": float(-(marginal * marginal.clamp_min(1e-300).log()).sum()),
        "class_histogram": torch.bincount(predicted, minlength=num_classes).tolist(),
    }
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if len(labels) != len(logits):
            raise NoisecraftError(f"Got {len(labels)} labels for {len(logits)} images; pass one label per image.")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise NoisecraftError(f"Labels must lie in 0..{num_classes - 1} for this {num_classes}-class "
                                  f"classifier, got values from {int(labels.min())} to {int(labels.max())}.")
        report["accuracy"] = float((predicted == labels).double().mean())
    return report


def classifier_report(classifier: SmallClassifier, images, labels=None, batch_size: int = 500) -> dict:
    """What the dataset's classifier says about generated images.

    Returns {"n", "entropy": mean predicted-class entropy in nats (low = confident, recognisable samples),
    "marginal_entropy": entropy of the mean prediction (log K = classes evenly covered), "class_histogram":
    count of samples predicted as each class} and, when `labels` (the conditioning class of each sample)
    are given, "accuracy": the share of samples classified as their conditioning class.
    """
    logits = map_batches(classifier, images, batch_size, classifier)
    return _report_from_logits(logits, labels)


# --------------------------------------------------------------------------------------------------
# everything at once


def sample_quality(images, reference_dataset, *, classifier: SmallClassifier, inception=None, labels=None,
                   k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                   batch_size: int = 500, inception_batch_size: int = 50) -> dict:
    """Sample-quality scores of generated `images` against a reference (an `ImageDataset` or image tensor).

    Returns {"domain_fid", "domain_kid", "domain_kid_std", "precision", "recall", "classifier": {...}} and,
    when `inception` (a loaded `FIDInception`) is given, also standard "fid", "kid" and "kid_std".
    Domain scores, precision and recall use the features of the dataset's small classifier: they are
    comparable only with numbers from the same classifier, reference split and image count, never with
    published FID (see `noisecraft.evaluation.fid`). The classifier report comes from the same forward pass.
    `labels`: the conditioning class of each generated image, for the report's accuracy.
    """
    reference = reference_dataset.images if hasattr(reference_dataset, "images") else reference_dataset
    real = classifier_features(classifier, reference, batch_size)
    fake = classifier_features(classifier, images, batch_size)
    with torch.no_grad():
        logits = classifier.head(torch.from_numpy(fake).to(next(classifier.parameters())).float())
    domain_kid, domain_kid_std = kid(real, fake, kid_subsets, kid_subset_size, seed)
    result = {
        "n": int(len(fake)),
        "n_reference": int(len(real)),
        "domain_fid": fid_from_features(real, fake),
        "domain_kid": domain_kid,
        "domain_kid_std": domain_kid_std,
        **precision_recall(real, fake, k=k),
        "classifier": _report_from_logits(logits.cpu(), labels),
    }
    if inception is not None:
        from .inception import inception_features

        real_i = inception_features(inception, reference, inception_batch_size)
        fake_i = inception_features(inception, images, inception_batch_size)
        result["fid"] = fid_from_features(real_i, fake_i)
        result["kid"], result["kid_std"] = kid(real_i, fake_i, kid_subsets, kid_subset_size, seed)
    for key in ("domain_fid", "domain_kid", "fid", "kid"):
        if key in result and not math.isfinite(result[key]):
            raise NoisecraftError(f"The {key} came out as {result[key]}; the images probably hold NaN values.")
    return result
