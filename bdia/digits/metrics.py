"""Sample quality for the digits model: class accuracy and a Frechet distance of classifier features.

``frechet_distance``: the Frechet (2-Wasserstein) distance between Gaussians fitted to two feature sets,
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` (Dowson & Landau 1982; the formula behind FID,
Heusel et al. 2017), in float64 with symmetric square roots from ``torch.linalg.eigh`` (no scipy).
``DigitsJudge`` applies it to the penultimate features of the shipped digits classifier (a digits analogue of
FID) and also reports how often samples are classified as the class they were asked for. The estimate is
biased upwards at small sample sizes, so compare only numbers computed with the same sizes, and against the
real-vs-real floor (``DigitsJudge.split``) that uses exactly those sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bdia.digits.nets import DigitsClassifier

__all__ = ["DigitsJudge", "Score", "class_accuracy", "frechet_distance", "sqrtm_psd"]


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (float64; tiny negative eigenvalues,
    which rounding produces, are clipped to 0)."""
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square matrix, got shape {tuple(a.shape)}")
    a = a.to(torch.float64)
    w, v = torch.linalg.eigh(0.5 * (a + a.T))
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _moments(f: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be (samples >= 2, features), got shape {tuple(f.shape)}")
    f = f.to(torch.float64)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``f1`` ``(n1, d)`` and ``f2`` ``(n2, d)``."""
    if f1.dim() == 2 and f2.dim() == 2 and f1.shape[1] != f2.shape[1]:
        raise ValueError(f"f1 and f2 must have the same feature size, got {f1.shape[1]} and {f2.shape[1]}")
    mu1, s1 = _moments(f1, "f1")
    mu2, s2 = _moments(f2, "f2")
    r1 = sqrtm_psd(s1)
    # tr (S1^1/2 S2 S1^1/2)^1/2 = sum of the square roots of that PSD matrix's eigenvalues
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def class_accuracy(classifier: DigitsClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images ``x`` that ``classifier`` assigns to ``labels``."""
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    with torch.no_grad():
        pred = classifier(x.to(next(classifier.parameters()).dtype)).argmax(1)
    return float((pred == labels.to(pred.device)).double().mean())


class Score(NamedTuple):
    accuracy: float
    fd: float


class DigitsJudge:
    """Scores images against a reference set of real digits with a (shipped) classifier's penultimate features.

    ``DigitsJudge.split(seed)`` halves the held-out real digits (class-stratified, seeded) into a reference
    half and a comparison half; ``floor()`` is the comparison half's score, the real-vs-real value
    that samples of the same size and labels (``labels``) can at best reach.
    """

    def __init__(
        self, classifier: DigitsClassifier, reference: torch.Tensor, compare: torch.Tensor, labels: torch.Tensor
    ):
        self.classifier = classifier
        self.reference_features = self.features(reference)
        self.compare, self.labels = compare, labels

    @classmethod
    def split(cls, seed: int = 0, classifier: DigitsClassifier | None = None) -> DigitsJudge:
        from bdia import digits

        x, y = digits.heldout()
        g = torch.Generator().manual_seed(seed)
        ref, cmp = [], []
        for c in range(10):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            half = idx.numel() // 2
            ref.append(idx[:half])
            cmp.append(idx[half:])
        ref_i, cmp_i = torch.cat(ref), torch.cat(cmp)
        return cls(classifier or digits.classifier(), x[ref_i], x[cmp_i], y[cmp_i])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.features(x.to(next(self.classifier.parameters()).dtype))

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> Score:
        """Class accuracy of images ``x`` drawn for ``labels``, and their FD to the reference half."""
        return Score(
            class_accuracy(self.classifier, x, labels), frechet_distance(self.features(x), self.reference_features)
        )

    def floor(self) -> Score:
        return self(self.compare, self.labels)
