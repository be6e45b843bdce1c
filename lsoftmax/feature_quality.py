"""Feature-quality measures for embeddings: angular spread, class separation, open-set checks.

All work on the directions of the features (L-Softmax's margin is angular): rows are normalized
first, so the measures do not depend on feature norms. Computed in float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["angular_stats", "nearest_neighbour_accuracy", "tar_at_far"]


def _unit_rows(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    if y.shape != (len(f),):
        raise ValueError(f"labels must have shape ({len(f)},), got {y.shape}")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("features must be finite and nonzero to have a direction")
    return f / norms, y


def _angle_deg(cos: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def angular_stats(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Angles in degrees: ``intra`` is the mean angle between a feature and its class's mean
    direction (the spread of a class), ``inter`` the mean and ``inter_min`` the smallest angle
    between two classes' mean directions (their separation)."""
    u, y = _unit_rows(features, labels)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("angular_stats needs at least two classes")
    centers = np.stack([u[y == k].mean(axis=0) for k in classes])
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    index = np.searchsorted(classes, y)
    intra = _angle_deg(np.einsum("nd,nd->n", u, centers[index]))
    pair = _angle_deg(centers @ centers.T)[np.triu_indices(len(classes), k=1)]
    return {
        "intra": float(intra.mean()),
        "inter": float(pair.mean()),
        "inter_min": float(pair.min()),
    }


def nearest_neighbour_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy under cosine similarity."""
    u, y = _unit_rows(features, labels)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return float((y[sim.argmax(axis=1)] == y).mean())


def tar_at_far(features: np.ndarray, labels: np.ndarray, far: float = 1e-3) -> float:
    """Verification on all pairs under cosine similarity: the fraction of same-class pairs
    accepted at the threshold that accepts a fraction ``far`` of different-class pairs."""
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far!r}")
    u, y = _unit_rows(features, labels)
    iu = np.triu_indices(len(y), k=1)
    sim = (u @ u.T)[iu]
    same = (y[:, None] == y[None, :])[iu]
    if same.all() or not same.any():
        raise ValueError("tar_at_far needs both same-class and different-class pairs")
    negatives = np.sort(sim[~same])
    # The threshold accepts at most `far` of the negatives (strictly above it).
    k = int(np.floor(far * len(negatives)))
    threshold = negatives[len(negatives) - 1 - k] if k < len(negatives) else -np.inf
    return float((sim[same] > threshold).mean())
