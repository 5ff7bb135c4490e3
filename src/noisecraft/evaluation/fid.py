"""Fréchet distance and the FID-style "domain score".

The Fréchet (2-Wasserstein) distance between two Gaussians N(mu1, S1) and N(mu2, S2) is

    d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

FID (Heusel et al., 2017) fits one Gaussian to the Inception-v3 pool features of real images and one to
those of generated images and reports d². The *domain score* here uses the same formula, but the features
come from the penultimate layer of a small CNN trained on the dataset itself
(`noisecraft.evaluation.classifier`). It is therefore cheap, offline and sensitive to what matters for
small grey-scale datasets, but it is NOT comparable to published Inception FID numbers, and only
comparable across runs that use the same classifier (same dataset, same `CLASSIFIER_VERSION`), the same
reference split and the same number of generated images (the estimate is biased upwards for small N).

Evaluation protocol used in noisecraft: 10,000 generated images against the dataset's test split.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import NoisecraftError
from .classifier import SmallClassifier, classifier_features


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean vector and covariance matrix (unbiased, float64) of an N x D feature array."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise NoisecraftError(
            f"Feature statistics need an N x D array with N >= 2, got shape {features.shape}; pass more images."
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}), computed in float64.
    The matrix square root comes from `scipy.linalg.sqrtm`. If the product is (numerically) singular and
    the root is not finite, `eps` is added to both diagonals and the root recomputed; a tiny imaginary
    part left by round-off is dropped, a large one is an error. The result is clamped at 0, since round-off
    can make the distance of a distribution to itself slightly negative.
    """
    try:
        from scipy import linalg
    except ImportError as exc:
        raise NoisecraftError("The Fréchet distance needs scipy; install it with `pip install scipy`.") from exc

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise NoisecraftError(
            f"Gaussian statistics do not match: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} "
            f"and {sigma2.shape}; compute both from features of the same classifier."
        )

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # A singular product (e.g. a feature that is always zero) is handled by the eps retry.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise NoisecraftError(
                f"The covariance square root has a large imaginary part ({largest:.3g}), which usually means too "
                f"few images for {mu1.size}-d features; use more images."
            )
        covmean = covmean.real

    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return max(float(distance), 0.0)


def fid_from_features(features1, features2) -> float:
    """Fréchet distance between Gaussians fitted to two N x D feature arrays."""
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def reference_statistics(reference, classifier: SmallClassifier, batch_size: int = 500):
    """(mu, sigma) of the classifier features of a reference: an `ImageDataset` or an image tensor/array."""
    images = reference.images if hasattr(reference, "images") else reference
    return feature_statistics(classifier_features(classifier, images, batch_size))


def domain_fid(images, reference_dataset, classifier: SmallClassifier, batch_size: int = 500) -> float:
    """FID-style domain score of `images` against a reference, in the feature space of `classifier`.

    `images`: N x C x H x W, uint8 (0..255) or float in [-1, 1]. `reference_dataset`: an `ImageDataset`
    (its `.images` are used, labels ignored), an image tensor/array, or precomputed `(mu, sigma)` from
    `reference_statistics` (handy when scoring many checkpoints against the same split).

    This is the Fréchet distance in the penultimate-layer features of a small classifier trained on the
    dataset (`load_or_train_classifier`), NOT Inception FID: the numbers are not comparable to published
    FID values, only to other domain scores from the same classifier, reference split and image count.
    """
    if isinstance(reference_dataset, tuple) and len(reference_dataset) == 2:
        mu_ref, sigma_ref = reference_dataset
    else:
        mu_ref, sigma_ref = reference_statistics(reference_dataset, classifier, batch_size)
    mu, sigma = feature_statistics(classifier_features(classifier, images, batch_size))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
