"""Cross-check of jaxreco.scenarios.coupons' empirical Qini curve against scikit-uplift's
``sklift.metrics.qini_curve`` (not a jaxreco dependency: it brings scikit-learn, pandas and
matplotlib). Run in a separate environment:

    python3 -m venv /tmp/skv && /tmp/skv/bin/pip install scikit-uplift numpy
    /tmp/skv/bin/python experiments/synthetic_coupons/sklift_check.py
"""
import importlib.util

import numpy as np
spec = importlib.util.spec_from_file_location("coupons", str(__import__("pathlib").Path(__file__).resolve().parents[2] / "jaxreco" / "scenarios" / "coupons.py"))
cp = importlib.util.module_from_spec(spec); spec.loader.exec_module(cp)
from sklift.metrics import qini_auc_score, qini_curve
rng = np.random.default_rng(0)
n = 5000
score = rng.random(n)                      # distinct scores: no tie handling differences
t = rng.random(n) < 0.5
y = (rng.random(n) < 0.1 + 0.2 * score * t).astype(int)
x, q = qini_curve(y, score, t.astype(int))
# my Q(n) at those n
order = np.argsort(-score, kind="stable")
tt, yy = t[order], y[order]
nt, nc = np.cumsum(tt), np.cumsum(~tt)
yt, yc = np.cumsum(np.where(tt, yy, 0)), np.cumsum(np.where(tt, 0, yy))
mine = yt - np.divide(yc * nt, nc, out=np.zeros(n), where=nc > 0)
idx = np.asarray(x[1:], int) - 1
print("max |Q_sklift - Q_mine| over", len(idx), "points:", np.max(np.abs(q[1:] - mine[idx])))
# area: sklift qini_auc_score = (auc(model) - auc(random)) / (auc(perfect) - auc(random)), trapezoid
print("sklift qini_auc_score:", qini_auc_score(y, score, t.astype(int)))
print("mine empirical_qini (unnormalized area per row^2):", cp.empirical_qini(score, t, y))
