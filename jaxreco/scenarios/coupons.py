"""Coupons: scoring a ranking of (user, coupon) pairs by uplift, and turning a coupon's
discount into the uplift model's discount levels (numpy only: the server imports it).

**Uplift curves against a known truth.** Pairs are ranked by a score (best first); each
pair has a true gain ``g`` (its true uplift of purchase probability, or uplift × margin:
its expected incremental value). The cumulative gain of the top ``n`` pairs is
``G(n) = Σ_{j ≤ n} g_(j)``; pairs with equal scores are in random order, so ``G`` inside a
group of tied scores is its expectation (linear between the group's ends). With ``N`` pairs:

* ``AUUC = (1/N) Σ_{n=1..N} G(n) / N``: the area under the cumulative-gain curve, x the
  fraction targeted, y the gain per pair of the population;
* the random ranking's area is that of one all-tied group,
  ``AUUC_rand = mean(g) (N + 1) / (2N)``, the oracle's that of the pairs sorted by ``g``;
* the Qini coefficient ``(AUUC − AUUC_rand) / (AUUC_oracle − AUUC_rand)``: 1 for the
  oracle ranking, 0 for random, below 0 for worse than random (Radcliffe 2007's Qini,
  normalised by the perfect model's as scikit-uplift's ``qini_auc_score`` does).

**Empirical Qini on a randomized log** (no truth needed: what a shop can measure): rows of
one discount level ``l`` and of the control, ranked by the predicted uplift of level ``l``;
``Q(n) = Y_t(n) − Y_c(n) N_t(n) / N_c(n)`` (treated buyers less the control's, scaled to the
treated count, among the top ``n``) and the area between ``Q`` and the line to ``Q(N)``.

**Discount levels.** The uplift model knows a few discount levels (percent, level 0 = no
coupon); a coupon of another percent gets the purchase probability interpolated linearly
between the two levels around it (above the top level, the top level's: no extrapolation).
"""

from __future__ import annotations

import numpy as np


def _check(score: np.ndarray, gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score, gain = np.asarray(score, np.float64), np.asarray(gain, np.float64)
    if score.shape != gain.shape or score.ndim != 1 or not len(score):
        raise ValueError(f"score {score.shape} and gain {gain.shape} must be equal, non-empty "
                         "1-d arrays")
    if not (np.isfinite(score).all() and np.isfinite(gain).all()):
        raise ValueError("score and gain must be finite")
    return score, gain


def gain_curve(score, gain) -> np.ndarray:
    """``G(n)`` for ``n = 1..N`` (float64 ``[N]``): the expected cumulative gain of the top
    ``n`` pairs ranked by ``score`` (ties in random order)."""
    score, gain = _check(score, gain)
    order = np.argsort(-score, kind="stable")
    s, g = score[order], gain[order]
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])          # first index of each group
    size = np.diff(np.r_[start, len(s)])
    total = np.add.reduceat(g, start)
    before = np.r_[0.0, np.cumsum(total)[:-1]]                     # G at the group's start
    grp = np.repeat(np.arange(len(start)), size)
    pos = np.arange(len(s)) - start[grp] + 1                       # 1..m inside the group
    return before[grp] + pos * total[grp] / size[grp]


def auuc(score, gain) -> float:
    """The area under the cumulative-gain curve, ``(1/N) Σ_n G(n) / N`` (module docstring)."""
    G = gain_curve(score, gain)
    return float(G.sum() / len(G) ** 2)


def qini(score, gain) -> dict[str, float]:
    """``{"auuc", "auuc_random", "auuc_oracle", "qini"}`` of ``score`` against the true
    ``gain`` of each pair (module docstring)."""
    score, gain = _check(score, gain)
    a = auuc(score, gain)
    rand = auuc(np.zeros_like(gain), gain)
    best = auuc(gain, gain)
    return {"auuc": a, "auuc_random": rand, "auuc_oracle": best,
            "qini": float((a - rand) / (best - rand)) if best > rand else 0.0}


def top_fraction_gain(score, gain, fraction: float) -> float:
    """The expected gain of the top ``fraction`` of pairs, as a share of the oracle's."""
    G = gain_curve(score, gain)
    n = max(1, int(round(fraction * len(G))))
    best = gain_curve(gain, gain)[n - 1]
    return float(G[n - 1] / best) if best > 0 else 0.0


def empirical_qini(score, treated, outcome, seed: int = 0) -> float:
    """The Qini area of ``score`` on randomized rows (``treated`` bool, ``outcome`` 0/1 or a
    value), per row of the population: ``(1/N) Σ_n (Q(n) − n Q(N) / N) / N`` with
    ``Q(n) = Y_t(n) − Y_c(n) N_t(n) / N_c(n)`` (the control term 0 while no control row is
    in); ties in a
    seeded random order."""
    score = np.asarray(score, np.float64)
    t = np.asarray(treated, bool)
    y = np.asarray(outcome, np.float64)
    if not (score.shape == t.shape == y.shape) or score.ndim != 1 or not len(score):
        raise ValueError("score, treated and outcome must be equal, non-empty 1-d arrays")
    tie = np.random.default_rng(seed).random(len(score))
    order = np.lexsort((tie, -score))
    t, y = t[order], y[order]
    nt, nc = np.cumsum(t), np.cumsum(~t)
    yt, yc = np.cumsum(np.where(t, y, 0.0)), np.cumsum(np.where(t, 0.0, y))
    q = yt - np.divide(yc * nt, nc, out=np.zeros(len(y)), where=nc > 0)
    n = np.arange(1, len(y) + 1)
    return float(np.mean(q - n * q[-1] / len(y)) / len(y))


def calibration(pred, true, bins: int = 10) -> dict[str, float]:
    """How the predicted uplifts match the true ones: ``mae``, ``bias`` (mean pred − true),
    ``slope`` (least-squares of true on pred), ``corr`` (Pearson), and ``ece``: the mean
    over ``bins`` equal-count bins of predicted uplift of |mean pred − mean true|, weighted
    by the bin's size."""
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    order = np.argsort(p, kind="stable")
    parts = np.array_split(order, min(bins, len(p)))
    ece = sum(len(b) * abs(p[b].mean() - t[b].mean()) for b in parts) / len(p)
    var = np.var(p)
    return {"mae": float(np.mean(np.abs(p - t))), "bias": float(np.mean(p - t)),
            "slope": float(np.cov(p, t, bias=True)[0, 1] / var) if var > 0 else 0.0,
            "corr": float(np.corrcoef(p, t)[0, 1]) if var > 0 and np.var(t) > 0 else 0.0,
            "ece": float(ece)}


def interpolate_levels(p_levels: np.ndarray, levels, percent) -> np.ndarray:
    """Purchase probabilities at ``percent`` (``[n]``) from those at the model's discount
    ``levels`` (``p_levels [n, L]``, ``levels[0] == 0``, rising): linear between the two
    levels around each percent, the top level's above it."""
    lv = np.asarray(levels, np.float64)
    pct = np.clip(np.asarray(percent, np.float64), 0.0, lv[-1])
    hi = np.minimum(np.searchsorted(lv, pct, side="left"), len(lv) - 1)
    lo = np.maximum(hi - 1, 0)
    w = np.where(lv[hi] > lv[lo], (pct - lv[lo]) / np.where(lv[hi] > lv[lo], lv[hi] - lv[lo], 1),
                 1.0)
    rows = np.arange(len(pct))
    return (1 - w) * p_levels[rows, lo] + w * p_levels[rows, hi]
