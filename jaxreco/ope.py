"""Off-policy evaluation (OPE): the click-through rate a new policy would get, estimated from
logs that another policy collected, with that policy's propensities.

**Data** (the notation of the Open Bandit Pipeline, ``obp``, so figures compare one to one):
``n`` logged rounds ``(x_t, a_t, k_t, r_t, p_t)``: context ``x_t`` (the user), action
``a_t`` (the item shown), position ``k_t ∈ {0..L-1}``, reward ``r_t`` (click) and
propensity ``p_t = π_b(a_t | x_t, k_t)`` of the logging (behaviour) policy. An evaluation
policy is an action distribution ``π_e(a | x_t, k)``, an array ``[n, A, L]`` summing to 1
over actions; its value is ``V(π_e) = E_t Σ_a π_e(a | x_t, k_t) q(x_t, a, k_t)`` with ``q``
the expected reward. ``w_t = π_e(a_t | x_t, k_t) / p_t`` is the importance weight and
``q̂`` a reward model (``[n, A, L]``). The four estimators (:data:`ESTIMATORS`)::

    ips    V̂ = 1/n Σ_t w_t r_t                        unbiased when p_t > 0 wherever π_e > 0
    snips  V̂ = Σ_t w_t r_t / Σ_t w_t                  biased O(1/n), bounded by max r
    dm     V̂ = 1/n Σ_t q̂(x_t, π_e)                    q̂(x, π) = Σ_a π(a|x,k) q̂(x,a,k); as
                                                      biased as q̂ is, no weights
    dr     V̂ = dm + 1/n Σ_t w_t (r_t − q̂(x_t,a_t,k_t))  unbiased when p is right, whatever q̂

Each is the mean of per-round terms (:func:`round_terms`, ``obp``'s
``_estimate_round_rewards``: ``snips``' term is ``w_t r_t / w̄``). ``q̂(x, π)`` is
``np.average(q̂, weights=π)`` as in ``obp``.

**Intervals** (:func:`evaluate`), both at level ``1 − alpha``:

* ``ci_low``/``ci_high``, the normal interval ``V̂ ± z_{1−α/2} sd(φ)/√n`` from each
  estimator's influence function ``φ_t``: the round term for ``ips``, ``dm``, ``dr``;
  ``w_t (r_t − V̂) / w̄`` for ``snips`` (delta method). ``dm`` and ``dr`` treat ``q̂`` as
  fixed (it must be fitted on other rows): ``dr``'s interval is then valid whatever ``q̂``,
  ``dm``'s covers only the spread of contexts, not the model's bias.
* ``boot_low``/``boot_high``/``boot_mean``, ``obp``'s ``estimate_interval``: the percentile
  interval of ``n_bootstrap`` resampled means of the round terms, drawn exactly as ``obp``
  draws them (``RandomState(seed).choice`` per resample), so the figures equal ``obp``'s for
  the same seed. For ``snips`` this keeps the full-sample normaliser ``w̄``.

**Policies**: :func:`uniform_policy`, :func:`softmax_policy` (a model's logits per item and
position, with a temperature; 0 = argmax), :func:`bernoulli_ts_policy` (``obp``'s
``BernoulliTS.compute_batch_action_dist``: the marginal of each item at each position when
the list is the top ``L`` of one Beta draw per item).

**Runs** (:func:`evaluate_run`, the ``jaxreco-ope`` command): a ``ctr`` run of
``jaxreco-train`` on data with ``position`` and ``propensity_score`` columns (the
``zozotown-obd`` source) is the reward model ``q̂ = σ(click logit)``; its *test split* is
the evaluation rows, which neither it nor the policy model trained on. The estimator and
policy functions above use numpy only.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
import yaml
from omegaconf import OmegaConf

from jaxreco import export_models, metrics as metrics_lib
from jaxreco.data import fetch, registry
from jaxreco.run import RestoredRun, restore_run

ESTIMATORS = ("ips", "snips", "dm", "dr")
NEEDS = {"ips": ("reward", "action", "pscore"), "snips": ("reward", "action", "pscore"),
         "dm": ("q_hat",), "dr": ("reward", "action", "pscore", "q_hat")}
SUM_TOLERANCE = 1e-6       # |Σ_a π_e(a|x,k) − 1| allowed


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class Inputs:
    """Checked OPE inputs: float64/int64 arrays, ``position`` filled with 0 when ``L = 1``."""

    action_dist: np.ndarray
    position: np.ndarray
    reward: np.ndarray | None = None
    action: np.ndarray | None = None
    pscore: np.ndarray | None = None
    q_hat: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.action_dist.shape[0]

    def weights(self) -> np.ndarray:
        """``w_t = π_e(a_t | x_t, k_t) / p_t``."""
        return self.action_dist[np.arange(self.n), self.action, self.position] / self.pscore


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _vector(name: str, x, n: int, kind: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name}: must be 1-dimensional with one entry per round of "
                         f"action_dist ({n}); got shape {a.shape}")
    if kind == "int":
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name}: must hold integers; got dtype {a.dtype}")
        return a.astype(np.int64)
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        t = _first_bad(~np.isfinite(a))
        raise ValueError(f"{name}: round {t} is {float(a[t])}; every value must be finite")
    return a


def check_inputs(estimator: str, *, action_dist, reward=None, action=None, pscore=None,
                 position=None, q_hat=None) -> Inputs:
    """The inputs ``estimator`` needs (:data:`NEEDS`), checked; a ``ValueError`` names the
    field, the round and the value that is wrong."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: must be one of {list(ESTIMATORS)}")
    given = {"reward": reward, "action": action, "pscore": pscore, "q_hat": q_hat}
    missing = [k for k in NEEDS[estimator] if given[k] is None]
    if missing:
        raise ValueError(f"{estimator} needs {', '.join(missing)}")
    pi = np.asarray(action_dist, dtype=np.float64)
    if pi.ndim != 3:
        raise ValueError(f"action_dist: must be [rounds, actions, positions] (3-dimensional);"
                         f" got shape {pi.shape}")
    n, num_actions, len_list = pi.shape
    if n == 0:
        raise ValueError("action_dist: has no rounds")
    if not (np.isfinite(pi).all() and (pi >= 0).all()):
        t = _first_bad(~(np.isfinite(pi) & (pi >= 0)).all(axis=(1, 2)))
        raise ValueError(f"action_dist: round {t} has a negative or non-finite probability")
    sums = pi.sum(axis=1)
    bad = np.abs(sums - 1.0) > SUM_TOLERANCE
    if bad.any():
        t, k = np.argwhere(bad)[0]
        raise ValueError(f"action_dist: round {t}, position {k} sums to {float(sums[t, k]):.9g} over "
                         f"the {num_actions} actions; each must sum to 1")
    if position is None:
        if len_list > 1:
            raise ValueError(f"position: needed when action_dist has {len_list} positions")
        pos = np.zeros(n, np.int64)
    else:
        pos = _vector("position", position, n, "int")
        if pos.min() < 0 or pos.max() >= len_list:
            t = _first_bad((pos < 0) | (pos >= len_list))
            raise ValueError(f"position: round {t} is {pos[t]}; must lie in [0, {len_list}) "
                             "(0-based; action_dist's last axis)")
    out = {"action_dist": pi, "position": pos}
    if action is not None:
        a = _vector("action", action, n, "int")
        if a.min() < 0 or a.max() >= num_actions:
            t = _first_bad((a < 0) | (a >= num_actions))
            raise ValueError(f"action: round {t} is {a[t]}; must lie in [0, {num_actions}) "
                             "(action_dist's second axis)")
        out["action"] = a
    if reward is not None:
        out["reward"] = _vector("reward", reward, n, "float")
    if pscore is not None:
        p = _vector("pscore", pscore, n, "float")
        if (p <= 0).any() or (p > 1).any():
            t = _first_bad((p <= 0) | (p > 1))
            raise ValueError(f"pscore: round {t} is {float(p[t])!r}; propensities must lie in (0, 1] "
                             "(a logged action the logging policy could not take cannot be "
                             "reweighted)")
        out["pscore"] = p
    if q_hat is not None:
        q = np.asarray(q_hat, dtype=np.float64)
        if q.shape != pi.shape:
            raise ValueError(f"q_hat: must have action_dist's shape {pi.shape}; got {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError(f"q_hat: round {_first_bad(~np.isfinite(q).all(axis=(1, 2)))} "
                             "has a non-finite value")
        out["q_hat"] = q
    if (out.get("action") is None) != (out.get("reward") is None):
        raise ValueError("action and reward: give both or neither")
    return Inputs(**out)


# ----------------------------------------------------------------------------- estimators
def _terms(estimator: str, x: Inputs) -> np.ndarray:
    rows = np.arange(x.n)
    if estimator in ("ips", "snips"):
        w = x.weights()
        if estimator == "ips":
            return x.reward * w
        with np.errstate(invalid="ignore", divide="ignore"):
            return x.reward * w / w.mean()
    q_pi = np.average(x.q_hat[rows, :, x.position], weights=x.action_dist[rows, :, x.position],
                      axis=1)
    if estimator == "dm":
        return q_pi
    return q_pi + x.weights() * (x.reward - x.q_hat[rows, x.action, x.position])


def round_terms(estimator: str, **inputs) -> np.ndarray:
    """Per-round terms whose mean is the estimate (``obp``'s ``_estimate_round_rewards``).
    ``inputs``: ``action_dist`` and what :data:`NEEDS` lists, ``position`` when ``L > 1``."""
    return _terms(estimator, check_inputs(estimator, **inputs))


def estimate(estimator: str, **inputs) -> float:
    """``V̂`` of ``estimator`` (``nan`` for ``snips`` when every weight is 0)."""
    return float(round_terms(estimator, **inputs).mean())


def influence(estimator: str, x: Inputs, value: float) -> np.ndarray:
    """``φ_t``, with ``V̂ − V ≈ mean(φ − V)``: the round term, or for ``snips`` the delta
    method's ``w_t (r_t − V̂) / w̄``."""
    if estimator == "snips":
        w = x.weights()
        return w * (x.reward - value) / w.mean()
    return _terms(estimator, x)


def bootstrap(samples: np.ndarray, *, alpha: float = 0.05, n_bootstrap: int = 10000,
              seed: int | None = None) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``n_bootstrap`` resampled means of ``samples``: ``obp``'s
    ``estimate_confidence_interval_by_bootstrap``. Resample ``b`` is
    ``RandomState(seed).choice(samples, n)``, the ``b``-th call, which draws the same indices
    as ``randint(0, n, n)``; they are drawn a block of resamples at a time here."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r}: must lie in (0, 1)")
    if int(n_bootstrap) < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap!r}: must be a positive integer")
    x = np.asarray(samples, np.float64)
    n = x.shape[0]
    rs = np.random.RandomState(seed)
    block = max(1, (1 << 22) // max(n, 1))
    means = []
    for start in range(0, int(n_bootstrap), block):
        m = min(block, int(n_bootstrap) - start)
        means.append(x[rs.randint(0, n, size=(m, n))].mean(axis=1))
    boot = np.concatenate(means)
    return (float(boot.mean()), float(np.percentile(boot, 100 * alpha / 2)),
            float(np.percentile(boot, 100 * (1 - alpha / 2))))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One estimator's figures (see the module docstring for the two intervals)."""

    value: float
    se: float
    ci_low: float
    ci_high: float
    boot_mean: float = math.nan
    boot_low: float = math.nan
    boot_high: float = math.nan

    def figures(self) -> dict[str, float]:
        d = {"": self.value, "/se": self.se, "/ci_low": self.ci_low, "/ci_high": self.ci_high}
        if not math.isnan(self.boot_low):
            d.update({"/boot_low": self.boot_low, "/boot_high": self.boot_high})
        return d


def evaluate(action_dist, *, reward=None, action=None, pscore=None, position=None,
             q_hat=None, estimators: Sequence[str] | None = None, alpha: float = 0.05,
             n_bootstrap: int = 0, seed: int | None = 12345) -> dict[str, Estimate]:
    """Every estimator the inputs allow (``dm``/``dr`` need ``q_hat``), or ``estimators``;
    normal intervals always, bootstrap ones when ``n_bootstrap > 0`` (every estimator
    resampled with the same ``seed``, as ``obp``'s ``OffPolicyEvaluation`` does)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r}: must lie in (0, 1)")
    names = list(estimators) if estimators is not None else [
        e for e in ESTIMATORS if q_hat is not None or e in ("ips", "snips")]
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    out = {}
    for e in names:
        x = check_inputs(e, action_dist=action_dist, reward=reward, action=action,
                         pscore=pscore, position=position, q_hat=q_hat)
        terms = _terms(e, x)
        v = float(terms.mean())
        phi = influence(e, x, v)
        se = float(phi.std(ddof=1) / math.sqrt(x.n)) if x.n > 1 else math.nan
        boot = (bootstrap(terms, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed)
                if n_bootstrap > 0 else (math.nan,) * 3)
        out[e] = Estimate(v, se, v - z * se, v + z * se, *boot)
    return out


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's ``(Σ w)² / Σ w²``: how many rounds the weighted estimate is worth."""
    w = np.asarray(weights, np.float64)
    s2 = float(np.sum(w * w))
    return float(np.sum(w) ** 2 / s2) if s2 > 0 else 0.0


# ----------------------------------------------------------------------------- policies
def uniform_policy(n_rounds: int, n_actions: int, len_list: int) -> np.ndarray:
    """``π(a) = 1/A`` at every position (a read-only broadcast view, no copy)."""
    return np.broadcast_to(np.full((1, n_actions, len_list), 1.0 / n_actions),
                           (n_rounds, n_actions, len_list))


def softmax_policy(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``π(a | x, k) = softmax_a(logit(x, a, k) / τ)`` over axis 1 of ``[n, A, L]`` logits;
    ``τ = 0`` is the argmax policy (ties to the lowest action index)."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 3:
        raise ValueError(f"logits: must be [rounds, actions, positions]; got shape {z.shape}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r}: must be >= 0 (0 = argmax)")
    if temperature == 0:
        pi = np.zeros_like(z)
        n, _, L = z.shape
        best = z.argmax(axis=1)
        pi[np.arange(n)[:, None], best, np.arange(L)[None, :]] = 1.0
        return pi
    s = z / temperature
    s = np.exp(s - s.max(axis=1, keepdims=True))
    return s / s.sum(axis=1, keepdims=True)


def bernoulli_ts_policy(alpha: Sequence[float], beta: Sequence[float], *, len_list: int,
                        n_sim: int = 100_000, seed: int | None = 12345) -> np.ndarray:
    """``[A, L]`` probability that Bernoulli Thompson sampling with ``Beta(alpha, beta)``
    posteriors puts each item at each position: ``n_sim`` draws of one ``θ_a`` per item,
    the list is the ``L`` largest. Equals ``obp.policy.BernoulliTS(n_actions=A,
    len_list=L, alpha, beta, random_state=seed).compute_batch_action_dist(n_sim=n_sim)[0]``
    (the same Beta draws, a block of simulations at a time)."""
    a, b = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"alpha, beta: must be 1-dimensional of one length; got shapes "
                         f"{a.shape}, {b.shape}")
    num_actions = a.shape[0]
    if not 1 <= len_list <= num_actions:
        raise ValueError(f"len_list={len_list}: must lie in [1, {num_actions}]")
    rs = np.random.RandomState(seed)
    counts = np.zeros((num_actions, len_list))
    block = max(1, (1 << 20) // num_actions)
    for start in range(0, int(n_sim), block):
        m = min(block, int(n_sim) - start)
        theta = rs.beta(a, b, size=(m, num_actions))
        top = np.argsort(theta, axis=1)[:, ::-1][:, :len_list]
        for k in range(len_list):
            counts[:, k] += np.bincount(top[:, k], minlength=num_actions)
    return counts / int(n_sim)


def logged_frequencies(action: np.ndarray, position: np.ndarray, n_actions: int,
                       len_list: int) -> np.ndarray:
    """``[A, L]``: the share of each action among the rounds logged at each position: the
    logging policy's action distribution averaged over the logging period (for a
    context-free policy, what its on-policy value is the value of)."""
    f = np.zeros((n_actions, len_list))
    np.add.at(f, (np.asarray(action, np.int64), np.asarray(position, np.int64)), 1.0)
    with np.errstate(invalid="ignore"):
        return f / f.sum(axis=0, keepdims=True)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """``½ Σ_a |p(a|k) − q(a|k)|`` averaged over positions ``k`` (``[A, L]`` arrays)."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=0).mean())


def tv_noise_floor(freq: np.ndarray, counts: np.ndarray, seed: int | None = 0,
                   repeats: int = 20) -> float:
    """Mean :func:`total_variation` between ``freq`` (``[A, L]``) and the frequencies of
    ``counts[k]`` draws from it: how far two logs of this size from one policy differ by
    chance alone."""
    rng = np.random.default_rng(seed)
    tvs = []
    for _ in range(repeats):
        sim = np.stack([rng.multinomial(int(c), freq[:, k]) / max(int(c), 1)
                        for k, c in enumerate(counts)], axis=1)
        tvs.append(total_variation(sim, freq))
    return float(np.mean(tvs))


# ----------------------------------------------------------------------------- OBD
BTS_PRIOR_MEMBER = "obp/policy/conf/prior_bts.yaml"


def bts_prior(campaign: str, *, version: str = "0.4.1",
              cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)`` by OBD item id: the Beta prior ZOZOTOWN's Bernoulli TS started
    the data collection with (``obp``'s ``is_zozotown_prior=True``), read from the obp
    wheel the ``zozotown-obd`` source reads its logs from."""
    wheel = fetch.fetch_wheel("obp", version, cache_dir)
    prior = yaml.safe_load(fetch.read_member(wheel, BTS_PRIOR_MEMBER))
    if campaign not in prior:
        raise ValueError(f"campaign={campaign!r}: {wheel.name}!{BTS_PRIOR_MEMBER} has priors "
                         f"for {sorted(prior)}")
    return (np.asarray(prior[campaign]["alpha"], np.float64),
            np.asarray(prior[campaign]["beta"], np.float64))


def logged_rows(dataset: Mapping, policy: str) -> dict[str, np.ndarray]:
    """All rows a logged policy (``random``/``bts``) wrote for ``dataset``'s campaign:
    ``item`` (raw id, str), ``position``, ``label``, ``propensity_score``."""
    src = registry.open_source({**dataset, "policies": [policy]})
    blocks = list(src.blocks())
    vocab = np.asarray(src.vocab("item")).astype(str)
    cat = {k: np.concatenate([b[k] for b in blocks]) for k in
           ("item", "position", "label", "propensity_score")}
    cat["item"] = vocab[cat["item"]]
    return cat


# ----------------------------------------------------------------------------- runs
def model_logits(run: RestoredRun, users: np.ndarray, positions: Sequence[int],
                 head: str = "click", batch_size: int = 65536) -> np.ndarray:
    """``[len(users), num_items, len(positions)]`` float64 logits of ``head`` of a restored
    ``embed_mlp`` run for every (user, item, position value), through the export's
    ``predict_fn`` (the function ``predict_ctr`` serves)."""
    t = run.task
    fns = export_models.embed_mlp_functions(
        run.graphdef, run.state.tables, run.state.dense, num_users=t.num_users,
        num_items=t.num_items, item_side=dict(t.item_side))
    if head not in fns.heads:
        raise ValueError(f"head={head!r}: the run's model has heads {list(fns.heads)}")
    predict = jax.jit(fns.predict_fn)
    users = np.asarray(users, np.int32)
    nu, ni, L = len(users), t.num_items, len(positions)
    u, i, k = (g.ravel() for g in np.meshgrid(users, np.arange(ni, dtype=np.int32),
                                              np.asarray(positions, np.int32), indexing="ij"))
    out = np.empty(u.shape[0], np.float64)
    for s in range(0, u.shape[0], batch_size):
        e = min(s + batch_size, u.shape[0])
        idx = np.arange(s, s + batch_size).clip(max=e - 1)   # one compiled shape
        ctx = {f: k[idx] for f in fns.context_features if f == "position"}
        out[s:e] = np.asarray(predict(fns.params, u[idx], i[idx], ctx)[head])[:e - s]
    return out.reshape(nu, ni, L)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _policy_name(t: float) -> str:
    return "model_argmax" if t == 0 else f"model_t{t:g}"


def evaluate_run(run_dir: str | Path, *, policy_run: str | Path | None = None,
                 temperatures: Sequence[float] = (0.0, 0.1, 1.0), alpha: float = 0.05,
                 n_bootstrap: int = 0, seed: int = 12345,
                 bts_n_sim: int = 100_000) -> dict[str, float | str]:
    """OPE figures (flat ``ope/...`` keys) of a ``ctr`` run on OBD-style logs.

    * evaluation rows: the run's test split (``propensity_score`` = ``p_t``, ``position``
      1-based in the data, 0-based here); ``q̂ = σ(click logit)`` of the run's model;
    * policies: ``random`` (uniform over the run's items); ``zozotown-obd`` only: ``bts``
      (:func:`bernoulli_ts_policy` with ZOZOTOWN's prior, ``bts_n_sim`` draws, ``seed``:
      what ``obp`` evaluates) and ``bts_logs`` (:func:`logged_frequencies` of the BTS logs:
      the action distribution BTS had on average while it logged the sample; its items and
      positions only, never its clicks), with ``ope/bts/tv_to_bts_logs`` the distance
      between the two and ``ope/bts_logs/tv_noise_floor`` that distance between two logs
      of this size from one policy; ``model_argmax``/``model_t<τ>``: :func:`softmax_policy` of ``policy_run``'s click
      logits (default: the run itself; another run must read the same prepared data, so
      the two index users and items alike);
    * ``ope/on_policy/<p>``: the mean click of every row logged policy ``p`` wrote for the
      campaign, the truth ``relative_error`` compares with (``|V̂ − V| / V``);
    * ``ope/<p>/all_rows/...``: ``ips``/``snips`` of the context-free policies on every row
      of the run's data (train and test: no model is involved).
    """
    run = restore_run(run_dir, full=False)
    t = run.task
    if t.kind != "ctr":
        raise ValueError(f"{run_dir}: task.kind={t.kind}; jaxreco-ope needs a ctr run (its "
                         "click model is the reward model)")
    need = ["position", "propensity_score", "label"]
    lacking = [c for c in need if c not in t.data.schema]
    if lacking:
        raise ValueError(f"{run_dir}: its data {t.data.name} ({t.data.path}) has no "
                         f"{', '.join(lacking)} column; OPE needs logged positions and "
                         "propensities (dataset=zozotown-obd has them)")
    policy = run
    if policy_run is not None and Path(policy_run).resolve() != Path(run_dir).resolve():
        policy = restore_run(policy_run, full=False)
        if policy.task.data.path != t.data.path:
            raise ValueError(f"--policy-run {policy_run} read {policy.task.data.path}, the "
                             f"reward run {run_dir} read {t.data.path}: they must read the "
                             "same prepared data (same dataset and task.prepare options)")
    cols = ["user", "item", "position", "label", "propensity_score"]
    test = t.data.load("test", cols)
    parts = [test] + [t.data.load(s, cols) for s in ("train", "val")]
    every = {c: np.concatenate([d[c] for d in parts]) for c in cols}
    if len(test["user"]) == 0:
        raise ValueError(f"{run_dir}: the test split is empty; the evaluation rows are the "
                         "test split (task.prepare.split.test_fraction > 0)")
    if every["position"].min() < 1:
        raise ValueError(f"{t.data.path}: position {every['position'].min()} < 1; "
                         "positions are 1-based in the logs")
    L = int(every["position"].max())
    A = t.num_items
    figures: dict[str, float | str] = {"ope/run": str(run_dir), "ope/rows": len(test["user"]),
                                       "ope/clicks": int(np.sum(test["label"] > 0)),
                                       "ope/logged_ctr": float(np.mean(test["label"] > 0))}

    def feedback(d):
        return {"reward": (np.asarray(d["label"]) > 0).astype(np.float64),
                "action": np.asarray(d["item"], np.int64),
                "position": np.asarray(d["position"], np.int64) - 1,
                "pscore": np.asarray(d["propensity_score"], np.float64)}

    fb = feedback(test)
    n = len(fb["reward"])
    users, inverse = np.unique(np.asarray(test["user"]), return_inverse=True)
    positions = np.arange(1, L + 1)
    reward_logits = model_logits(run, users, positions)
    q_hat = _sigmoid(reward_logits)[inverse]
    rows = np.arange(n)
    q_logged = q_hat[rows, fb["action"], fb["position"]]
    figures.update({"ope/reward_model/auc": metrics_lib.auc(q_logged, fb["reward"]),
                    "ope/reward_model/pred_ctr": float(q_logged.mean())})

    # ---- policies: action distributions over the evaluation rows (and all rows)
    dists: dict[str, np.ndarray] = {"random": uniform_policy(n, A, L)}
    all_rows: dict[str, np.ndarray] = {"random": uniform_policy(len(every["user"]), A, L)}
    truth: dict[str, float] = {}
    ds = OmegaConf.to_container(run.cfg.dataset, resolve=True, enum_to_str=True)
    if ds.get("name") == "zozotown-obd":
        raw_items = t.data.table("item_vocab")["raw_id"].astype(str)
        item_index = {r: j for j, r in enumerate(raw_items)}
        for p in ("random", "bts"):
            logs = logged_rows(ds, p)
            truth[p] = float(np.mean(logs["label"] > 0))
            figures.update({f"ope/on_policy/{p}": truth[p],
                            f"ope/on_policy/{p}/rows": len(logs["label"]),
                            f"ope/on_policy/{p}/clicks": int(np.sum(logs["label"] > 0))})
        # logs: BTS's own rows; only their items and positions are used below
        unknown = sorted(set(logs["item"]) - set(item_index))
        if unknown:
            raise ValueError(f"the bts logs show items {unknown[:5]} that {t.data.path} does "
                             "not know")
        shown = logged_frequencies(np.array([item_index[r] for r in logs["item"]]),
                                   np.asarray(logs["position"], np.int64) - 1, A, L)
        a_prior, b_prior = bts_prior(str(ds["campaign"]), version=str(ds["version"]),
                                     cache_dir=ds.get("cache_dir"))
        ids = raw_items.astype(np.int64)
        if len(a_prior) != A or sorted(ids.tolist()) != list(range(A)):
            raise ValueError(f"{t.data.path}: its {A} items (ids {ids.min()}..{ids.max()}) "
                             f"are not the {len(a_prior)} items of the BTS prior of campaign "
                             f"{ds['campaign']}")
        bts = bernoulli_ts_policy(a_prior, b_prior, len_list=L, n_sim=bts_n_sim,
                                  seed=seed)[ids]
        truth["bts_logs"] = truth["bts"]
        for name, d in (("bts", bts), ("bts_logs", shown)):
            dists[name] = np.broadcast_to(d[None], (n, A, L))
            all_rows[name] = np.broadcast_to(d[None], (len(every["user"]), A, L))
        counts = np.bincount(np.asarray(logs["position"], np.int64) - 1, minlength=L)
        figures.update({"ope/bts/tv_to_bts_logs": total_variation(bts, shown),
                        "ope/bts_logs/tv_noise_floor": tv_noise_floor(shown, counts, seed)})
    if temperatures:
        logits = reward_logits if policy is run else model_logits(policy, users, positions)
        for tau in temperatures:
            dists[_policy_name(float(tau))] = softmax_policy(logits, float(tau))[inverse]
        figures["ope/policy_run"] = str(policy_run or run_dir)

    # ---- estimates
    for name, pi in dists.items():
        w = pi[rows, fb["action"], fb["position"]] / fb["pscore"]
        figures[f"ope/{name}/ess"] = effective_sample_size(w)
        res = evaluate(pi, q_hat=q_hat, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed, **fb)
        if name in all_rows:
            full = evaluate(all_rows[name], estimators=("ips", "snips"), alpha=alpha,
                            n_bootstrap=n_bootstrap, seed=seed, **feedback(every))
            res.update({f"all_rows/{k}": v for k, v in full.items()})
        for est, r in res.items():
            for suffix, v in r.figures().items():
                figures[f"ope/{name}/{est}{suffix}"] = v
            if name in truth:
                figures[f"ope/{name}/{est}/relative_error"] = abs(r.value - truth[name]) / truth[name]
    return figures
