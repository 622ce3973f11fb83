"""Scores a trained coupon uplift model (``jaxreco-train experiment=synthetic_coupons``)
against the generator's ground truth (experiments/coupons_uplift/README.md).

    python scripts/uplift_eval.py --run-dir outputs/synthetic_coupons/<run> [--split test]

Pairs: every (user, coupon) with a coupon = (category, discount level > 0), for the users
of ``--split``'s rows (at most ``--max-users``, a seeded sample). Rankings, best first:

* ``model``: predicted uplift P(buy | d) − P(buy | 0) (× the category's margin for value);
* ``largest_discount``: the coupon's discount, ties in random order (the expected curve);
* ``largest_discount_margin`` (value only): the discount, then the category's margin;
* ``nonpersonal_model`` / ``nonpersonal_oracle``: the model's / the true uplift of the
  (category, level) averaged over the users (blind to who the user is: the second is the
  best such a ranking can do; the gap to ``model`` is what personalisation adds);
* ``random``; and ``oracle``: the true uplift (value): the ceiling.

Figures (``name: value`` lines): Qini coefficient and AUUC against the true uplift
(``gain=uplift``) and the true incremental value uplift × margin (``gain=value``), the share
of the oracle's gain in the top 10% / 30%, the calibration of the predicted uplift, and the
empirical Qini on the split's randomized log rows (no truth: how a shop would choose, the
number the hyper-parameters are chosen by on ``--split val``).
"""

from __future__ import annotations

import argparse

import numpy as np
from omegaconf import OmegaConf

from jaxreco import uplift
from jaxreco.data import synthetic
from jaxreco.scenarios import coupons


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--max-users", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    r = uplift.load(a.run_dir)
    ds = OmegaConf.to_container(r.cfg.dataset, resolve=True)
    truth = synthetic.coupon_truth(ds)
    raw_u = r.task.data.table("user_vocab")["raw_id"].astype(np.int64)
    raw_i = r.task.data.table("item_vocab")["raw_id"].astype(str)
    cat_of = np.array([int(s[1:]) for s in raw_i])               # "c<k>" -> k
    split = r.task.split[a.split]
    users = np.unique(np.asarray(split["user"]))
    rng = np.random.default_rng(a.seed)
    if len(users) > a.max_users:
        users = np.sort(rng.choice(users, a.max_users, replace=False))
    P = uplift.probabilities(r, users)                            # [n, I, L]
    n, ni, L = P.shape
    pred = (P[:, :, 1:] - P[:, :, :1]).reshape(-1)
    uu = np.repeat(users, ni * (L - 1))
    ii = np.tile(np.repeat(np.arange(ni), L - 1), n)
    ll = np.tile(np.arange(1, L), n * ni)
    true = truth.uplift(raw_u[uu], cat_of[ii], ll)
    margin = truth.margin(cat_of[ii])
    pct = truth.levels[ll]
    print(f"run: {a.run_dir}")
    print(f"split: {a.split}")
    print(f"users: {n}")
    print(f"pairs: {len(pred)}")
    rand_tie = np.zeros(len(pred))
    # non-personal rankings: the uplift of (category, level) averaged over the users, from
    # the model and from the truth (the best any ranking blind to the user can do)
    cell = ii * L + ll
    count = np.maximum(np.bincount(cell, minlength=ni * L), 1)
    np_model, np_true = ((np.bincount(cell, v, ni * L) / count)[cell] for v in (pred, true))
    for gain_name, gain, model_score, extra in (
            ("uplift", true, pred, {}),
            ("value", true * margin, pred * margin,
             {"largest_discount_margin": pct * 1e6 + margin})):
        w = margin if gain_name == "value" else 1.0
        rankings = {"model": model_score, "largest_discount": pct, **extra,
                    "nonpersonal_model": np_model * w, "nonpersonal_oracle": np_true * w,
                    "random": rand_tie, "oracle": gain}
        for name, score in rankings.items():
            q = coupons.qini(score, gain)
            print(f"{gain_name}/{name}/qini: {q['qini']:.4f}")
            print(f"{gain_name}/{name}/auuc: {q['auuc']:.5f}")
            for f in (0.1, 0.3):
                print(f"{gain_name}/{name}/top{int(f * 100)}_share_of_oracle: "
                      f"{coupons.top_fraction_gain(score, gain, f):.4f}")
    for k, v in coupons.calibration(pred, true).items():
        print(f"calibration/{k}: {v:.4f}")
    print(f"calibration/mean_pred_uplift: {pred.mean():.4f}")
    print(f"calibration/mean_true_uplift: {true.mean():.4f}")
    # the empirical Qini on the split's randomized rows, one discount level at a time
    su, si, sl = (np.asarray(split[c], np.int64) for c in ("user", "item", uplift.DISCOUNT))
    y = np.asarray(split["label"], np.float64)
    p_rows = uplift.predict(r, np.repeat(su, L), np.repeat(si, L), np.tile(np.arange(L), len(su))
                            ).reshape(len(su), L)
    emp, emp_true = [], []
    for lv in range(1, L):
        keep = (sl == 0) | (sl == lv)
        score = p_rows[keep, lv] - p_rows[keep, 0]
        emp.append(coupons.empirical_qini(score, sl[keep] == lv, y[keep], seed=a.seed))
        t = truth.uplift(raw_u[su[keep]], cat_of[si[keep]], np.full(keep.sum(), lv))
        emp_true.append(coupons.empirical_qini(t, sl[keep] == lv, y[keep], seed=a.seed))
        print(f"empirical/level{lv}_{truth.levels[lv]:g}pct/model_qini_area: {emp[-1]:.5f}")
    print(f"empirical/model_qini_area: {np.mean(emp):.5f}")
    print(f"empirical/truth_qini_area: {np.mean(emp_true):.5f}")


if __name__ == "__main__":
    from jaxreco.runtime import configure_xla
    configure_xla()   # before JAX starts (jaxreco/runtime.py: XLA:CPU's scheduler can wedge solves)
    main()
