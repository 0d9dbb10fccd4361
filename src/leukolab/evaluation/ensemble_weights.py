"""Ensemble weights fitted on validation predictions: one weight per member, weights >= 0 summing to 1.

The ensemble's probabilities are the weighted mean of its members' probabilities
(``sum_m w_m p_m``). Two objectives, and no fitting at all:

* ``log_loss`` -- the mean negative log-probability of the true class. It is
  convex in the weights (minus the log of a linear function), so SLSQP over the
  simplex (bounds ``[0, 1]``, one equality constraint, analytic gradient) finds
  the global minimum; the uniform weights and every single member are also
  scored and the best of all is kept, in case SLSQP stops early.
* ``balanced_accuracy`` -- piecewise constant in the weights (it changes only
  where an argmax flips), so gradient methods see a zero gradient. Candidates:
  the log-loss solution, uniform weights, every single member and, for 2-3
  members, a simplex grid (step 0.05: 21 or 231 points); then Nelder-Mead over
  softmax-parametrised weights (no constraints needed) from the best candidate,
  with a large initial simplex. The winner has the highest balanced accuracy;
  ties go to the lower log-loss, so among equally accurate weightings the best
  calibrated one is kept (and a perfect member takes all the weight).
* ``equal`` -- ``1/M`` each, nothing fitted (the members are only scored): the
  choice when the validation set is too small to fit weights without over-fitting.

scikit-learn has no ensemble-weight fitter for pre-computed probabilities
(``VotingClassifier`` takes fixed weights and refits its members), hence this
module; the scores match :func:`sklearn.metrics.log_loss` (with clipping at
``1e-12``) and :func:`sklearn.metrics.balanced_accuracy_score` (classes present in ``y``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize

from leukolab.errors import LeukolabError

__all__ = ["OBJECTIVES", "balanced_accuracy", "fit_weights", "log_loss", "mix"]

#: the objectives :func:`fit_weights` knows
OBJECTIVES = ("log_loss", "balanced_accuracy", "equal")

_EPS = 1e-12
_GRID_STEP = 0.05


def mix(probs: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """``sum_m weights[m] * probs[m]``: the ensemble's ``(N, K)`` probabilities."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.stack(probs).astype(np.float64), axes=1)


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true class ``y`` (probabilities clipped at ``1e-12``)."""
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _EPS, None))))


def balanced_accuracy(p: np.ndarray, y: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` of the argmax of ``p``."""
    pred = p.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _check(probs: Sequence[np.ndarray], y: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    if len(probs) < 1:
        raise LeukolabError("no ensemble members; expected at least one member's probabilities")
    arrays = [np.asarray(p, dtype=np.float64) for p in probs]
    y = np.asarray(y)
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise LeukolabError(f"member probabilities of shapes {[a.shape for a in arrays]}; expected one (N, K) shape")
    if y.shape != (shape[0],) or (y.size and (y.min() < 0 or y.max() >= shape[1])):
        raise LeukolabError(f"labels of shape {y.shape}; expected {shape[0]} class codes in 0..{shape[1] - 1}")
    if y.size == 0:
        raise LeukolabError("no samples to fit ensemble weights on")
    return arrays, y.astype(np.int64)


def _clean(w: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(w, dtype=np.float64), 0.0, None)
    w[w < 1e-6] = 0.0
    if w.sum() <= 0:
        w = np.ones_like(w)
    return w / w.sum()


def _fit_log_loss(probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    m = len(probs)
    true = np.stack([p[np.arange(len(y)), y] for p in probs], 1)  # (N, M): each member's p(true class)

    def loss(w: np.ndarray) -> float:
        return float(-np.mean(np.log(np.clip(true @ w, _EPS, None))))

    def grad(w: np.ndarray) -> np.ndarray:
        return -np.mean(true / np.clip(true @ w, _EPS, None)[:, None], axis=0)

    res = minimize(loss, np.full(m, 1.0 / m), jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    candidates = [_clean(res.x), np.full(m, 1.0 / m), *np.eye(m)]
    return min(candidates, key=loss)


def _simplex_grid(m: int, step: float) -> list[np.ndarray]:
    n = round(1 / step)
    return [np.array([*c, n - sum(c)], dtype=np.float64) / n
            for c in itertools.product(range(n + 1), repeat=m - 1) if sum(c) <= n]


def _fit_balanced_accuracy(probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    m = len(probs)
    seen: list[tuple[float, float, np.ndarray]] = []

    def score(w: np.ndarray) -> tuple[float, float]:
        p = mix(probs, w)
        ba, ll = balanced_accuracy(p, y), log_loss(p, y)
        seen.append((ba, ll, w))
        return ba, ll

    candidates = [_fit_log_loss(probs, y), np.full(m, 1.0 / m), *np.eye(m)]
    if m <= 3:
        candidates += _simplex_grid(m, _GRID_STEP)
    for w in candidates:
        score(_clean(w))
    best = max(seen, key=lambda s: (s[0], -s[1]))[2]

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    def objective(z: np.ndarray) -> float:
        ba, ll = score(_clean(softmax(z)))
        return -ba + 1e-4 * ll  # the small log-loss term only breaks ties inside Nelder-Mead

    z0 = np.log(best + 1e-3)
    simplex = np.vstack([z0, z0 + 1.5 * np.eye(m)])  # a large first simplex: the landscape is flat in small steps
    minimize(objective, z0, method="Nelder-Mead", options={"initial_simplex": simplex, "maxfev": 200 * m,
                                                           "xatol": 1e-3, "fatol": 1e-9})
    return max(seen, key=lambda s: (s[0], -s[1]))[2]


def fit_weights(probs: Sequence[np.ndarray], y: Sequence[int] | np.ndarray,
                objective: str = "log_loss") -> np.ndarray:
    """One weight per member (``>= 0``, summing to 1) for the mean ``sum_m w_m probs[m]``.

    Args:
        probs: each member's ``(N, K)`` probabilities of the same ``N`` images over the same ``K`` classes.
        y: the true class codes ``(N,)``.
        objective: ``log_loss`` (minimised), ``balanced_accuracy`` (maximised) or ``equal`` (``1/M`` each);
            see the module notes.

    Raises:
        LeukolabError: no members, mismatched shapes, labels out of range, or an unknown objective.
    """
    if objective not in OBJECTIVES:
        raise LeukolabError(f"objective {objective!r}; expected one of: {', '.join(OBJECTIVES)}")
    arrays, codes = _check(probs, np.asarray(y))
    if len(arrays) == 1:
        return np.ones(1)
    if objective == "equal":
        return np.full(len(arrays), 1.0 / len(arrays))
    w = _fit_log_loss(arrays, codes) if objective == "log_loss" else _fit_balanced_accuracy(arrays, codes)
    return _clean(w)
