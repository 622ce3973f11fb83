"""Off-policy evaluation (:mod:`jaxreco.ope`, ``jaxreco-ope``).

The reference is ``obp`` (Open Bandit Pipeline) 0.4.1 itself, without installing it: obp
needs torch, scikit-learn, pandas and matplotlib. The ``obp_lib`` fixture takes the wheel
the ``zozotown-obd`` source reads (:func:`jaxreco.data.fetch.fetch_wheel`, the default
cache; the tests skip, saying so, only when it cannot be fetched), copies five of its
modules unchanged into a temporary package — ``obp/utils.py``, ``obp/ope/estimators.py``,
``obp/policy/{policy_type,base,contextfree}.py`` and ``obp/policy/conf/prior_bts.yaml`` —
with empty ``__init__.py`` files (obp's own pull in every estimator, plotting, sklearn
models), and imports them with stand-ins for what they import but the code under test
does not run:

* ``torch``: a module whose ``Tensor`` is an empty class (the estimators' annotations and
  ``isinstance`` checks name it; only their ``*_tensor`` methods use torch);
* ``pandas``: an empty module (``obp/utils.py`` uses it in the slate checks only);
* ``sklearn.utils.check_random_state``: scikit-learn's own definition, copied below (the
  bootstrap and BernoulliTS draw from the ``RandomState`` it returns, so the intervals
  depend on it being the same).

numpy 2.x: the loaded modules use none of the removed aliases (``np.float``, ``np.int``...;
only ``obp/policy/offline.py``, not loaded, does), so nothing is patched; a test checks it.
The stand-ins are in ``sys.modules`` only while the modules import.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxreco import ope
from jaxreco.cli import ope as ope_cli
from jaxreco.data import fetch, zozotown
from jaxreco.data.dataset import DataError
from jaxreco.run import restore_run
from tests.support import train

OBP_MODULES = ["obp/utils.py", "obp/ope/estimators.py", "obp/policy/policy_type.py",
               "obp/policy/base.py", "obp/policy/contextfree.py",
               "obp/policy/conf/prior_bts.yaml"]
OBP_CLASS = {"ips": "InverseProbabilityWeighting",
             "snips": "SelfNormalizedInverseProbabilityWeighting",
             "dm": "DirectMethod", "dr": "DoublyRobust"}


def _check_random_state(seed):
    """scikit-learn 1.x ``sklearn.utils.check_random_state``, verbatim in behaviour."""
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, numbers.Integral):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"{seed!r} cannot be used to seed a numpy.random.RandomState instance")


@pytest.fixture(scope="module")
def obp_wheel() -> Path:
    try:
        return fetch.fetch_wheel(zozotown.PACKAGE, zozotown.VERSION)
    except DataError as e:
        pytest.skip(f"obp=={zozotown.VERSION} wheel (the reference implementation and the "
                    f"OBD sample) cannot be fetched: {e}")


@pytest.fixture(scope="module")
def obp_lib(obp_wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("obp_ref")
    for member in OBP_MODULES:
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(fetch.read_member(obp_wheel, member))
    for pkg in ("obp", "obp/ope", "obp/policy"):
        (root / pkg / "__init__.py").write_text("")
    torch = types.ModuleType("torch")
    torch.Tensor = type("Tensor", (), {})
    sklearn, sk_utils = types.ModuleType("sklearn"), types.ModuleType("sklearn.utils")
    sk_utils.check_random_state = _check_random_state
    sklearn.utils = sk_utils
    stubs = {"torch": torch, "pandas": types.ModuleType("pandas"), "sklearn": sklearn,
             "sklearn.utils": sk_utils}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    sys.path.insert(0, str(root))
    try:
        import obp.ope.estimators as estimators
        import obp.policy.contextfree as contextfree
        import obp.utils as utils
    finally:
        sys.path.remove(str(root))
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k == "obp" or k.startswith("obp.")]:
            del sys.modules[k]
    return types.SimpleNamespace(estimators=estimators, contextfree=contextfree, utils=utils,
                                 root=root)


def _obp_value_and_interval(lib, est, inputs, n_boot, seed, alpha=0.05):
    kw = {"action_dist": inputs["action_dist"], "position": inputs.get("position")}
    if est != "dm":
        kw.update(reward=inputs["reward"], action=inputs["action"], pscore=inputs["pscore"])
    if est in ("dm", "dr"):
        kw["estimated_rewards_by_reg_model"] = inputs["q_hat"]
    e = getattr(lib.estimators, OBP_CLASS[est])()
    v = e.estimate_policy_value(**kw)
    ci = e.estimate_interval(**kw, alpha=alpha, n_bootstrap_samples=n_boot, random_state=seed)
    lvl = 100 * (1.0 - alpha)
    return v, (ci["mean"], ci[f"{lvl}% CI (lower)"], ci[f"{lvl}% CI (upper)"])


def _assert_equals_obp(lib, inputs, n_boot=300, seed=7):
    ours = ope.evaluate(n_bootstrap=n_boot, seed=seed, **inputs)
    assert list(ours) == list(ope.ESTIMATORS)
    for est, r in ours.items():
        v, (bm, lo, hi) = _obp_value_and_interval(lib, est, inputs, n_boot, seed)
        assert abs(r.value - v) <= 1e-9, (est, r.value, v)
        assert abs(ope.estimate(est, **inputs) - v) <= 1e-9
        assert max(abs(r.boot_mean - bm), abs(r.boot_low - lo), abs(r.boot_high - hi)) <= 1e-9, (
            est, (r.boot_mean, r.boot_low, r.boot_high), (bm, lo, hi))


def _synthetic(seed, n, A, L):
    rng = np.random.default_rng(seed)
    pi_b = rng.dirichlet(np.ones(A), size=(n, L)).transpose(0, 2, 1)      # [n, A, L]
    pos = rng.integers(0, L, n)
    action = np.array([rng.choice(A, p=pi_b[t, :, pos[t]]) for t in range(n)])
    inputs = {"action_dist": rng.dirichlet(np.full(A, 0.5), size=(n, L)).transpose(0, 2, 1),
              "reward": rng.binomial(1, 0.3, n).astype(float), "action": action,
              "pscore": pi_b[np.arange(n), action, pos], "q_hat": rng.random((n, A, L))}
    if L > 1:
        inputs["position"] = pos
    return inputs


# ----------------------------------------------------------------------------- vs obp
@pytest.mark.parametrize("seed,n,A,L", [(0, 501, 7, 1), (1, 1000, 20, 3), (2, 64, 2, 2)])
def test_estimators_and_bootstrap_equal_obps_on_random_synthetic_feedback(obp_lib, seed, n, A, L):
    _assert_equals_obp(obp_lib, _synthetic(seed, n, A, L))


def test_estimators_equal_obps_on_the_obd_sample_with_obps_bts_policy(obp_lib, obp_wheel):
    """The Random policy's logs of the OBD sample (campaign all, 10K rows) with the BTS
    policy obp simulates (``is_zozotown_prior=True``) as the evaluation policy."""
    ds = {"name": "zozotown-obd", "version": zozotown.VERSION, "campaign": "all",
          "cache_dir": str(obp_wheel.parent)}
    logs = ope.logged_rows(ds, "random")
    n = len(logs["label"])
    assert n == 10000 and int(logs["label"].sum()) == 38
    bts_obp = obp_lib.contextfree.BernoulliTS(
        n_actions=80, len_list=3, is_zozotown_prior=True, campaign="all",
        random_state=12345).compute_batch_action_dist(n_rounds=1, n_sim=3000)
    alpha, beta = ope.bts_prior("all", cache_dir=str(obp_wheel.parent))
    bts = ope.bernoulli_ts_policy(alpha, beta, len_list=3, n_sim=3000, seed=12345)
    np.testing.assert_array_equal(bts, bts_obp[0])
    action = logs["item"].astype(np.int64)
    position = np.asarray(logs["position"], np.int64) - 1
    rate = np.full((80, 3), 0.5)                       # a reward model: smoothed click rate
    np.add.at(rate, (action, position), logs["label"])
    rate /= 1.0 + np.bincount(action * 3 + position, minlength=240).reshape(80, 3)
    inputs = {"action_dist": np.broadcast_to(bts[None], (n, 80, 3)), "reward": logs["label"],
              "action": action, "position": position,
              "pscore": np.asarray(logs["propensity_score"], np.float64),
              "q_hat": np.broadcast_to(rate[None], (n, 80, 3))}
    _assert_equals_obp(obp_lib, inputs, n_boot=200, seed=3)


def test_bernoulli_ts_equals_obps_with_any_prior(obp_lib):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 5, 9), rng.uniform(0.5, 20, 9)
    ref = obp_lib.contextfree.BernoulliTS(n_actions=9, len_list=4, alpha=a, beta=b,
                                          random_state=5).compute_batch_action_dist(n_sim=2500)
    got = ope.bernoulli_ts_policy(a, b, len_list=4, n_sim=2500, seed=5)
    np.testing.assert_array_equal(got, ref[0])
    np.testing.assert_allclose(got.sum(axis=0), 1.0)


def test_loaded_obp_modules_use_no_alias_numpy_2_removed(obp_lib):
    removed = ("np.float(", "np.int(", "np.bool(", "np.object(", "np.float)", "np.int)")
    for member in OBP_MODULES[:-1]:
        text = (obp_lib.root / member).read_text()
        assert not [r for r in removed if r in text], member


# ----------------------------------------------------------------------------- simulations
def _bandit(rng, n, A=5):
    """Contexts x ∈ {0, 1}; q(x, a) known; a context-dependent logging policy; one position."""
    q = np.array([[0.1, 0.3, 0.5, 0.2, 0.4], [0.6, 0.2, 0.1, 0.5, 0.3]])[:, :A]
    pi_b = np.array([[0.4, 0.3, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.3, 0.3]])
    pi_e = np.array([[0.05, 0.15, 0.6, 0.05, 0.15], [0.6, 0.1, 0.1, 0.1, 0.1]])
    x = rng.integers(0, 2, n)
    a = (rng.random(n)[:, None] > np.cumsum(pi_b[x], axis=1)).sum(axis=1)
    r = (rng.random(n) < q[x, a]).astype(float)
    truth = 0.5 * (pi_e * q).sum(axis=1).sum()
    return {"action_dist": pi_e[x][:, :, None], "reward": r, "action": a,
            "pscore": pi_b[x, a]}, q[x][:, :, None], truth


def test_ips_is_unbiased_on_a_simulated_bandit():
    rng = np.random.default_rng(0)
    est = []
    for _ in range(400):
        inputs, _, truth = _bandit(rng, 300)
        est.append(ope.estimate("ips", **inputs))
    est = np.asarray(est)
    # mean of 400 estimates within 3 standard errors of the truth (0.445 here)
    assert abs(est.mean() - truth) < 3 * est.std(ddof=1) / math.sqrt(len(est)), (est.mean(), truth)
    assert abs(est.mean() - truth) / truth < 0.01


def test_snips_and_dr_normal_intervals_cover_the_truth_at_the_nominal_rate():
    """250 logs of 800 rounds; DR's reward model is wrong by +0.15 everywhere (DR must not
    care), and DM with that model, whose interval only knows the contexts' spread, must
    miss the truth nearly always."""
    rng = np.random.default_rng(1)
    reps, cover = 250, {"snips": 0, "dr": 0, "ips": 0, "dm": 0}
    for _ in range(reps):
        inputs, q, truth = _bandit(rng, 800)
        res = ope.evaluate(q_hat=np.clip(q + 0.15, 0, 1), alpha=0.05, **inputs)
        for e in cover:
            cover[e] += res[e].ci_low <= truth <= res[e].ci_high
    rate = {e: c / reps for e, c in cover.items()}
    for e in ("snips", "dr", "ips"):
        assert 0.90 <= rate[e] <= 0.99, rate          # nominal 0.95; binomial sd 0.014
    assert rate["dm"] < 0.05, rate


# ----------------------------------------------------------------------------- inputs
def test_bad_inputs_are_rejected_naming_the_field_round_and_value():
    x = _synthetic(0, 20, 4, 3)
    bad = dict(x, pscore=np.where(np.arange(20) == 3, 0.0, x["pscore"]))
    with pytest.raises(ValueError, match=r"pscore: round 3 is 0\.0; propensities must lie in \(0, 1\]"):
        ope.estimate("ips", **bad)
    with pytest.raises(ValueError, match=r"action: must be 1-dimensional with one entry per "
                                         r"round of action_dist \(20\); got shape \(19,\)"):
        ope.evaluate(**dict(x, action=x["action"][:-1]))
    with pytest.raises(ValueError, match=r"q_hat: must have action_dist's shape \(20, 4, 3\); "
                                         r"got \(20, 4, 2\)"):
        ope.estimate("dr", **dict(x, q_hat=x["q_hat"][:, :, :2]))
    with pytest.raises(ValueError, match=r"action: round 0 is 4; must lie in \[0, 4\)"):
        ope.estimate("ips", **dict(x, action=np.full(20, 4)))
    with pytest.raises(ValueError, match=r"action_dist: round 0, position 0 sums to 2 over the 4 actions; "
                                         r"each must sum to 1"):
        ope.estimate("ips", **dict(x, action_dist=x["action_dist"] * 2))
    with pytest.raises(ValueError, match=r"position: needed when action_dist has 3 positions"):
        ope.estimate("ips", **{k: v for k, v in x.items() if k != "position"})
    with pytest.raises(ValueError, match=r"reward: round 2 is nan"):
        ope.estimate("snips", **dict(x, reward=np.where(np.arange(20) == 2, np.nan, 1.0)))
    with pytest.raises(ValueError, match=r"dm needs q_hat"):
        ope.estimate("dm", **{k: v for k, v in x.items() if k != "q_hat"})


def test_softmax_policy_argmax_and_limits():
    z = np.array([[[0.0, 1.0], [2.0, 1.0], [2.0, -1.0]]])            # [1 round, 3 items, 2 pos]
    np.testing.assert_array_equal(ope.softmax_policy(z, 0.0)[0], [[0, 1], [1, 0], [0, 0]])
    p = ope.softmax_policy(z, 1.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0, :, 0], np.exp([0, 2, 2]) / np.exp([0, 2, 2]).sum())
    np.testing.assert_allclose(ope.softmax_policy(z, 1e6), 1 / 3, atol=1e-5)


# ----------------------------------------------------------------------------- jaxreco-ope
def _stand_in_wheel(cache: Path, n=6000, n_users=40, n_items=12, seed=0):
    """A stand-in for the obp wheel with Random and BTS logs of one click model
    ``q(u, a, k) = σ(−1.5 + 1.6·[cat_a = u mod 3] + 0.8 g_a − 0.5k)``, and a BTS prior that
    favours items of high quality ``g_a``. Returns the truth (each policy's expected CTR
    over uniform users and positions) and ``q``."""
    rng = np.random.default_rng(seed)
    cat, good = rng.integers(0, 3, n_items), rng.normal(0, 1, n_items)
    alpha, beta = np.round(5 + 8 * (good - good.min())), np.full(n_items, 60.0)
    bts = ope.bernoulli_ts_policy(alpha, beta, len_list=3, n_sim=20000, seed=1)

    def q(u, a, k):
        return 1 / (1 + np.exp(-(-1.5 + 1.6 * (cat[a] == u % 3) + 0.8 * good[a] - 0.5 * k)))

    qa = q(np.arange(n_users)[:, None, None], np.arange(n_items)[None, :, None],
           np.arange(3)[None, None, :])                                   # [U, A, L]
    truth = {"random": float(qa.mean()), "bts": float((qa * bts[None]).sum(1).mean())}
    head = (",timestamp,item_id,position,click,propensity_score,user_feature_0,"
            "user_feature_1,user_feature_2,user_feature_3\n")
    files = {}
    for policy in ("random", "bts"):
        u, k = rng.integers(0, n_users, n), rng.integers(0, 3, n)
        pi = np.full((n_items, 3), 1 / n_items) if policy == "random" else bts
        a = (rng.random(n)[:, None] > np.cumsum(pi[:, k].T, axis=1)).sum(axis=1).clip(max=n_items - 1)
        click = rng.random(n) < q(u, a, k)
        files[f"obp/dataset/obd/{policy}/all/all.csv"] = head + "".join(
            f"{r},2019-11-24 {r // 3600 % 24:02d}:{r // 60 % 60:02d}:{r % 60:02d}.000000+00:00,"
            f"{a[r]},{k[r] + 1},{int(click[r])},{float(pi[a[r], k[r]])!r},f{u[r]},g{u[r] % 3},h,k\n"
            for r in range(n))
        files[f"obp/dataset/obd/{policy}/all/item_context.csv"] = (
            ",item_id,item_feature_0,item_feature_1,item_feature_2,item_feature_3\n"
            + "".join(f"{i},{i},0.0,cat{cat[i]},x,y\n" for i in range(n_items)))
    files[ope.BTS_PRIOR_MEMBER] = json.dumps({"all": {"alpha": alpha.tolist(),
                                                      "beta": beta.tolist()}})
    cache.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    (cache / "obp-0.4.1-py3-none-any.whl").write_bytes(buf.getvalue())
    return truth, q


def test_jaxreco_ope_on_a_known_bandit_reports_every_estimator_and_covers_the_truth(
        tmp_path, monkeypatch, capsys):
    """``experiment=zozotown_ope`` trained on a stand-in OBD wheel, then ``jaxreco-ope``:
    the reward model scores the test rows exactly as the trainer's evaluation did (same
    AUC and mean prediction), the context-free policies' all-rows intervals cover their
    true CTR, and the printed figures are the JSON's."""
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    truth, q = _stand_in_wheel(wheels)
    run = tmp_path / "run"
    metrics = train(run, ["experiment=zozotown_ope", f"dataset.cache_dir={wheels}",
                          "trainer.epochs=2", "trainer.progress_bar=false",
                          "trainer.async_checkpoint=false", "logger.tensorboard=false"])
    assert ope_cli.main([str(run), "--temperatures", "0,1", "--n-bootstrap", "200",
                         "--bts-n-sim", "20000", "--seed", "1"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    fig = json.loads((run / "ope.json").read_text())
    assert set(lines) == set(fig)
    for k, v in fig.items():
        if isinstance(v, float):
            assert float(lines[k]) == pytest.approx(v, rel=1e-5, abs=1e-12), k
    assert fig["ope/rows"] == 3000
    assert fig["ope/reward_model/auc"] == pytest.approx(metrics["test/auc"], abs=1e-6)
    assert fig["ope/reward_model/pred_ctr"] == pytest.approx(metrics["test/pred_ctr"], rel=1e-5)
    assert fig["ope/reward_model/auc"] > 0.6
    # random on its own logs: every weight is 1 (up to float32 propensities)
    assert fig["ope/random/ips"] == pytest.approx(fig["ope/logged_ctr"], rel=1e-6)
    assert fig["ope/random/ess"] == pytest.approx(3000, rel=1e-6)
    # the simulated BTS is the policy that logged the bts rows: tv within sampling noise
    assert fig["ope/bts/tv_to_bts_logs"] < 2 * fig["ope/bts_logs/tv_noise_floor"]
    assert truth["bts"] > truth["random"] + 0.05
    for p in ("random", "bts"):
        for e in ("ips", "snips"):
            lo, hi = fig[f"ope/{p}/all_rows/{e}/ci_low"], fig[f"ope/{p}/all_rows/{e}/ci_high"]
            assert lo <= truth[p] <= hi, (p, e, lo, truth[p], hi)
        for e in ope.ESTIMATORS:
            v, on = fig[f"ope/{p}/{e}"], fig[f"ope/on_policy/{p}"]
            assert fig[f"ope/{p}/{e}/relative_error"] == pytest.approx(abs(v - on) / on)
            assert fig[f"ope/{p}/{e}/boot_low"] <= v <= fig[f"ope/{p}/{e}/boot_high"]
    # the model's argmax policy: its true CTR on the evaluation rows, from the known q
    r = restore_run(run, full=False)
    test = r.task.data.load("test", ["user", "position"])
    raw = r.task.data.table("user_vocab")["raw_id"].astype(str)
    u = np.array([int(s.split("|")[0][1:]) for s in raw])[test["user"]]
    k = np.asarray(test["position"], np.int64) - 1
    logits = ope.model_logits(r, test["user"], [1, 2, 3])
    best = logits[np.arange(len(k)), :, k].argmax(axis=1)
    item = r.task.data.table("item_vocab")["raw_id"].astype(np.int64)[best]
    v_argmax = float(q(u, item, k).mean())
    assert v_argmax > truth["random"] + 0.1                   # the model learnt the pattern
    for e in ("ips", "snips", "dr"):
        assert fig[f"ope/model_argmax/{e}/ci_low"] <= v_argmax <= fig[f"ope/model_argmax/{e}/ci_high"]
    assert fig["ope/model_argmax/ess"] == pytest.approx(3000 / 12, rel=0.2)


def test_jaxreco_ope_errors_name_the_problem(tmp_path, capsys):
    assert ope_cli.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (f"jaxreco-ope: {tmp_path / 'nope'}: not a jaxreco-train "
                                       "run directory (no config.yaml)\n")
