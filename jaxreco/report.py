"""The online A/B report: what each arm's shoppers did with what it served.

Input: the events directory of ``jaxreco-serve`` (:mod:`jaxreco.data.events` reads and joins
it into impression *slots*: one shown ``(request, item)``, with the deepest stage reached
and the purchase value). Per arm:

* ``impressions`` (slots), ``users`` (distinct shoppers with an impression), ``requests``;
* ``ctr`` = clicked slots / slots; ``add_to_cart_rate`` = slots carted / slots;
  ``conversion_rate`` = slots purchased / slots; ``revenue_per_impression`` = purchase
  value / slots. A slot counts once per stage however many events hit it; a cart or a
  purchase counts as a click (the funnel has no cart without a click).

**Intervals: delta method, clustered by shopper.** Each metric is a ratio of sums
``R = Σ_j Y_j / Σ_j X_j`` over shoppers ``j`` (``X_j`` the shopper's impressions, ``Y_j``
their clicks, carts, purchases or revenue). A shopper's impressions are not independent
(one shopper clicks more than another), so the binomial interval is too narrow; the
shoppers are. With ``n`` shoppers, ``X̄`` the mean impressions per shopper and residuals
``d_j = Y_j − R X_j`` (which sum to 0),

    Var(R) ≈ Σ_j d_j² / (n (n − 1) X̄²),

the first-order (delta-method) variance of a ratio of means, whose 95% interval is
``R ± 1.96 √Var(R)`` (Deng, Knoblich & Lu 2018, "Applying the delta method in metric
analytics"). ``design_effect`` = Var(R) / the binomial ``R(1 − R)/N`` says how much wider
clustering makes it.

**Lift.** Arms have disjoint shoppers (the split is by user), so the estimates are
independent. The relative lift of arm ``t`` over the control ``c`` is ``R_t / R_c − 1``;
on the log scale ``θ = ln R_t − ln R_c`` with ``Var θ ≈ Var R_t / R_t² + Var R_c / R_c²``,
the interval is ``exp(θ ± 1.96 √Var θ) − 1`` and the two-sided p-value ``2 (1 − Φ(|θ| /
√Var θ))``, so the interval excludes 0 exactly when p < 0.05. Where a rate is 0 the log
is undefined: then the lift is not given and p tests the difference ``R_t − R_c``.

**Sample-ratio mismatch.** Shoppers per arm (from the served records) against the traffic
split (``--split``, else the ``split`` the server recorded, else equal): Pearson's χ² with
``arms − 1`` degrees of freedom; p < 0.001 is flagged: the arms' shoppers then differ for a
reason other than chance (a broken assignment, lost events), and the comparison is suspect.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import special

from jaxreco.data import events as events_lib
from jaxreco.data.readers import BadRows

Z95 = 1.959963984540054          # Φ⁻¹(0.975)
SRM_ALPHA = 0.001
# metric -> (what the numerator is per slot, label)
METRICS: dict[str, str] = {
    "ctr": "CTR",
    "add_to_cart_rate": "add-to-cart",
    "conversion_rate": "conversion",
    "revenue_per_impression": "revenue/impr.",
}
METHOD = ("95% intervals: delta method for a ratio of sums, clustered by shopper (user id, "
          "else session); lift: log ratio of two independent arms, two-sided z test; "
          f"sample-ratio mismatch: Pearson chi-square, flagged at p < {SRM_ALPHA:g}")


class ReportError(ValueError):
    """The events cannot be reported on; the message says why."""


# ----------------------------------------------------------------------------- statistics
@dataclasses.dataclass(frozen=True)
class Estimate:
    """A ratio of sums with its clustered standard error and 95% interval."""

    value: float
    se: float
    lo: float
    hi: float
    clusters: int
    design_effect: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ratio_estimate(y: np.ndarray, x: np.ndarray, z: float = Z95) -> Estimate:
    """``R = Σy / Σx`` over clusters with the delta-method standard error (module
    docstring). ``y``, ``x``: one entry per cluster (a shopper's sums)."""
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    n = len(x)
    if n == 0 or x.sum() <= 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, n)
    r = float(y.sum() / x.sum())
    if n < 2:
        return Estimate(r, math.nan, math.nan, math.nan, n)
    d = y - r * x
    var = float(np.dot(d, d) / (n * (n - 1) * x.mean() ** 2))
    se = math.sqrt(var)
    deff = None
    if 0 < r < 1:
        binom = r * (1 - r) / x.sum()
        deff = var / binom
    return Estimate(r, se, r - z * se, r + z * se, n, deff)


def normal_p(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def relative_lift(treat: Estimate, control: Estimate, z: float = Z95) -> dict[str, Any]:
    """Lift ``R_t / R_c − 1`` with its log-scale interval and two-sided p-value; and the
    difference ``R_t − R_c`` with its interval (see the module docstring)."""
    diff = treat.value - control.value
    se_diff = math.sqrt(treat.se ** 2 + control.se ** 2)
    out: dict[str, Any] = {"diff": diff, "diff_lo": diff - z * se_diff,
                           "diff_hi": diff + z * se_diff}
    if treat.value > 0 and control.value > 0 and math.isfinite(se_diff):
        theta = math.log(treat.value / control.value)
        se = math.sqrt((treat.se / treat.value) ** 2 + (control.se / control.value) ** 2)
        out.update(lift=math.exp(theta) - 1, lo=math.exp(theta - z * se) - 1,
                   hi=math.exp(theta + z * se) - 1,
                   p=normal_p(theta / se) if se > 0 else (1.0 if theta == 0 else 0.0),
                   test="log ratio")
    else:
        p = (normal_p(diff / se_diff) if se_diff > 0 else (1.0 if diff == 0 else 0.0)) \
            if math.isfinite(se_diff) else math.nan
        out.update(lift=None, lo=None, hi=None, p=p, test="difference")
    return out


def srm_check(counts: Mapping[str, int], weights: Mapping[str, float]) -> dict[str, Any]:
    """Pearson χ² of observed ``counts`` per arm against ``weights`` (any scale)."""
    arms = list(weights)
    w = np.array([float(weights[a]) for a in arms])
    obs = np.array([float(counts.get(a, 0)) for a in arms])
    total = obs.sum()
    if total == 0 or len(arms) < 2 or (w <= 0).any():
        return {"arms": arms, "observed": obs.astype(int).tolist(), "expected": None,
                "chi2": None, "df": len(arms) - 1, "p": None, "mismatch": False}
    exp = total * w / w.sum()
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(arms) - 1
    p = float(special.gammaincc(df / 2.0, chi2 / 2.0))     # χ² survival function
    return {"arms": arms, "observed": obs.astype(int).tolist(),
            "expected": [round(float(e), 3) for e in exp], "chi2": chi2, "df": df, "p": p,
            "mismatch": bool(p < SRM_ALPHA)}


# ----------------------------------------------------------------------------- per arm
def _numerators(log: events_lib.Log, m: np.ndarray) -> dict[str, np.ndarray]:
    st = log.slot_stage[m]
    return {"ctr": (st >= 1).astype(np.float64), "add_to_cart_rate": (st >= 2).astype(np.float64),
            "conversion_rate": (st >= 3).astype(np.float64),
            "revenue_per_impression": log.slot_value[m]}


def _cluster_sums(keys: np.ndarray, cols: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    uniq, inv = np.unique(keys.astype(str), return_inverse=True)
    x = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    return x, {k: np.bincount(inv, weights=v, minlength=len(uniq)) for k, v in cols.items()}


def arm_figures(log: events_lib.Log, arm: str, *, until: float | None = None,
                z: float = Z95, where: np.ndarray | None = None) -> dict[str, Any]:
    """Counts and the four metrics (:class:`Estimate`) of one arm's slots (those received
    up to ``until``, and where ``where`` [slots] is true, if given)."""
    m = np.asarray(log.slot_arm == arm, bool) & np.asarray(log.slot_shopper != None, bool)  # noqa: E711
    if where is not None:
        m &= where
    if until is not None:
        m &= log.slot_ts <= until
    nums = _numerators(log, m)
    x, ys = _cluster_sums(log.slot_shopper[m], nums)
    out: dict[str, Any] = {
        "impressions": int(m.sum()), "users": int(len(x)),
        "clicks": int(nums["ctr"].sum()), "carts": int(nums["add_to_cart_rate"].sum()),
        "purchases": int(nums["conversion_rate"].sum()),
        "revenue": float(nums["revenue_per_impression"].sum())}
    for k in METRICS:
        out[k] = ratio_estimate(ys[k], x, z)
    return out


def slot_platforms(path: str, log: events_lib.Log) -> np.ndarray:
    """The platform (``app``, ``web``, ...; None unknown) of each slot of ``log``: the
    ``platform`` of its request's served record (the platform of the session's latest event
    when the request carried a session), else of the first event about the request that
    names one. Records without the field (servers before it) leave it unknown."""
    served: dict[str, str] = {}
    from_events: dict[str, str] = {}
    for _, _, line in events_lib.read_lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # collect() reports bad lines
        if not isinstance(rec, dict):
            continue
        p, req = rec.get("platform"), rec.get("request_id")
        if not isinstance(p, str) or not p or not isinstance(req, str):
            continue
        if rec.get("kind") == "served":
            served.setdefault(req, p)
        else:
            from_events.setdefault(req, p)
    return np.asarray([served.get(r, from_events.get(r)) for r in log.slot_request], dtype=object)


def platform_figures(log: events_lib.Log, platforms: np.ndarray, arms: Sequence[str]
                     ) -> dict[str, dict[str, Any]]:
    """``{platform: {arm: figures}}`` (:func:`arm_figures` of the slots of each platform);
    empty when no slot has a platform."""
    names = sorted({p for p in platforms if p is not None})
    if not names:
        return {}
    out = {}
    for p in names + ([None] if any(x is None for x in platforms) else []):
        where = np.asarray([x == p for x in platforms], bool)
        out["(unknown)" if p is None else p] = {a: arm_figures(log, a, where=where) for a in arms}
    return out


def analyze(log: events_lib.Log, *, control: str | None = None,
            split: Mapping[str, float] | None = None,
            platforms: np.ndarray | None = None) -> dict[str, Any]:
    """The whole report as plain data (see the module docstring); ``platforms`` (one per
    slot, :func:`slot_platforms`) adds ``per_platform``: the figures of each platform's
    slots, per arm."""
    arms = sorted({a for a in log.served_arm if a is not None}
                  | {a for a in log.slot_arm if a is not None})
    if split:
        arms = list(split) + [a for a in arms if a not in split]
    if not arms:
        raise ReportError("no arm is named in the served records or the events; was the "
                          "server run with --arm?")
    control = control if control is not None else arms[0]
    if control not in arms:
        raise ReportError(f"--control {control!r} is not an arm of these events; arms: {arms}")
    arms = [control] + [a for a in arms if a != control]
    per_arm = {}
    for a in arms:
        f = arm_figures(log, a)
        sm = np.asarray(log.served_arm == a, bool)
        f["requests"] = int(sm.sum())
        f["model_versions"] = sorted({str(v) for v in log.served_version[sm] if v is not None}
                                     | {str(v) for v, x in zip(log.slot_version, log.slot_arm)
                                        if x == a and v is not None})
        per_arm[a] = f
    lifts = {a: {k: relative_lift(per_arm[a][k], per_arm[control][k]) for k in METRICS}
             for a in arms if a != control}

    # sample-ratio mismatch: shoppers per arm in the served records
    served_users: dict[str, set] = {a: set() for a in arms}
    for s, a in zip(log.served_shopper, log.served_arm):
        if s is not None and a in served_users:
            served_users[a].add(s)
    every = [s for a in arms for s in served_users[a]]
    multi = len(every) - len(set(every))
    if split:
        weights, split_from = {a: float(split.get(a, 0.0)) for a in arms}, "--split"
    elif len(log.splits) == 1:
        weights, split_from = {a: float(log.splits[0].get(a, 0.0)) for a in arms}, "served records"
    else:
        weights, split_from = {a: 1.0 for a in arms}, (
            "equal (no split recorded)" if not log.splits else
            f"equal ({len(log.splits)} different splits recorded: pass --split)")
    srm = srm_check({a: len(served_users[a]) for a in arms}, weights)
    srm.update(split=weights, split_from=split_from, users_in_several_arms=multi)

    c = log.counts
    no_arm = int(sum(a is None for a in log.slot_arm))
    per_platform = platform_figures(log, platforms, arms) if platforms is not None else {}
    return {"control": control, "arms": arms, "per_arm": per_arm, "lift": lifts, "srm": srm,
            "per_platform": per_platform,
            "method": METHOD, "counts": dict(c, slots_without_arm=no_arm),
            "time_range": [float(log.slot_ts.min()), float(log.slot_ts.max())]
            if len(log.slot_ts) else None}


def winner(result: Mapping[str, Any], metric: str = "ctr", alpha: float = 0.05) -> str | None:
    """The arm whose ``metric`` beats every other arm significantly (the control's lift
    interval entirely below 0 counts for the control), or None."""
    control = result["control"]
    best = max(result["arms"], key=lambda a: result["per_arm"][a][metric].value)
    if best == control:
        ok = all(result["lift"][a][metric]["p"] < alpha and
                 result["per_arm"][a][metric].value < result["per_arm"][control][metric].value
                 for a in result["lift"])
    else:
        ok = result["lift"][best][metric]["p"] < alpha and all(
            relative_lift(result["per_arm"][best][metric], result["per_arm"][a][metric])["p"]
            < alpha for a in result["arms"] if a != best)
    return best if ok and len(result["arms"]) > 1 else None


# ----------------------------------------------------------------------------- output
def _fmt(e: Estimate, metric: str) -> str:
    if not math.isfinite(e.value):
        return "-"
    if metric == "revenue_per_impression":
        return f"{e.value:.3f} [{e.lo:.3f}, {e.hi:.3f}]"
    return f"{100 * e.value:.2f}% [{100 * e.lo:.2f}, {100 * e.hi:.2f}]"


def _fmt_lift(d: Mapping[str, Any]) -> str:
    if d.get("lift") is None:
        return f"n/a (p {d['p']:.2g})" if d.get("p") is not None and math.isfinite(d["p"]) else "n/a"
    return f"{100 * d['lift']:+.1f}% [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] p {d['p']:.2g}"


def table_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["arm", "versions", "requests", "impressions", "users"] + [
        METRICS[k] + " [95% CI]" for k in METRICS]
    rows = []
    for a in result["arms"]:
        f = result["per_arm"][a]
        rows.append([a, ",".join(f["model_versions"]), str(f["requests"]),
                     str(f["impressions"]), str(f["users"])] + [_fmt(f[k], k) for k in METRICS])
    return head, rows


def platform_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["platform", "arm", "impressions", "users"] + [
        METRICS[k] + " [95% CI]" for k in METRICS]
    rows = []
    for p, arms in result.get("per_platform", {}).items():
        for a, f in arms.items():
            rows.append([p, a, str(f["impressions"]), str(f["users"])]
                        + [_fmt(f[k], k) for k in METRICS])
    return head, rows


def lift_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["arm vs " + result["control"]] + [METRICS[k] + " lift [95% CI]" for k in METRICS]
    rows = [[a] + [_fmt_lift(result["lift"][a][k]) for k in METRICS] for a in result["lift"]]
    return head, rows


def _text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa
    return "\n".join([line(head), line(["-" * x for x in w]), *map(line, rows)])


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def _srm_line(srm: Mapping[str, Any]) -> str:
    if srm["p"] is None:
        return "sample-ratio check: not enough data"
    obs = ", ".join(f"{a} {o}" for a, o in zip(srm["arms"], srm["observed"]))
    flag = "MISMATCH (p < 0.001): do not trust the comparison" if srm["mismatch"] else "ok"
    extra = (f"; {srm['users_in_several_arms']} shoppers in several arms"
             if srm["users_in_several_arms"] else "")
    return (f"sample-ratio check: users {obs} vs split {srm['split']} ({srm['split_from']}): "
            f"chi2 {srm['chi2']:.2f}, df {srm['df']}, p {srm['p']:.3g}: {flag}{extra}")


def text(result: Mapping[str, Any]) -> str:
    """The terminal report: per-arm table, lift table, SRM line, method."""
    parts = [_text_table(*table_rows(result))]
    if result["lift"]:
        parts.append(_text_table(*lift_rows(result)))
    if result.get("per_platform"):
        parts.append("per platform:\n" + _text_table(*platform_rows(result)))
    w = winner(result)
    parts.append(f"winner on CTR: {w if w else 'none (no significant difference)'}")
    parts.append(_srm_line(result["srm"]))
    parts.append(result["method"])
    return "\n\n".join(parts)


def markdown(result: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    c = result["counts"]
    w = winner(result)
    parts = ["# A/B report", "", _md_table(*table_rows(result)), ""]
    if result["lift"]:
        parts += [_md_table(*lift_rows(result)), ""]
    if result.get("per_platform"):
        parts += ["Per platform (the platform of the request's latest session event, else of "
                  "an event about it):", "", _md_table(*platform_rows(result)), ""]
    parts += [f"Winner on CTR: **{w if w else 'none (no significant difference)'}**.", "",
              _srm_line(result["srm"]) + ".", "", result["method"] + ".", "",
              f"Read: {c['lines']} lines, {c['served']} served requests, {c['slots']} impression "
              f"slots ({c['implied_impressions']} implied by a click, cart or purchase without "
              f"an impression event), {c['duplicate_events']} duplicate events ignored, "
              f"{c['slots_without_arm']} slots without an arm, "
              f"{c['slots_without_shopper']} without a shopper.", ""]
    parts += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(parts) + "\n"


def jsonable(result: Mapping[str, Any]) -> Any:
    def conv(o):
        if isinstance(o, Estimate):
            return conv(o.as_dict())
        if isinstance(o, Mapping):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, np.generic):
            return conv(o.item())
        return o
    return conv(result)


def plot_over_time(log: events_lib.Log, result: Mapping[str, Any], out_dir: Path,
                   points: int = 40) -> list[Path]:
    """``ctr_over_time.png``: each arm's cumulative CTR with its 95% band, against minutes
    since the first impression. Needs matplotlib (the ``sweep`` extra)."""
    from matplotlib.figure import Figure

    if not len(log.slot_ts):
        return []
    t0, t1 = float(log.slot_ts.min()), float(log.slot_ts.max())
    grid = np.linspace(t0, t1, points)[1:] if t1 > t0 else np.array([t1])
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for a in result["arms"]:
        est = [arm_figures(log, a, until=float(t))["ctr"] for t in grid]
        mins = (grid - t0) / 60.0
        v = np.array([e.value for e in est])
        lo = np.array([e.lo for e in est])
        hi = np.array([e.hi for e in est])
        ax.plot(mins, 100 * v, label=f"{a} ({', '.join(result['per_arm'][a]['model_versions'])})")
        ax.fill_between(mins, 100 * lo, 100 * hi, alpha=0.25)
    ax.set_xlabel("minutes since the first impression")
    ax.set_ylabel("cumulative CTR (%), 95% band")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out_dir / "ctr_over_time.png"
    fig.savefig(path, dpi=110)
    return [path]


def report(events_dir: str, *, out_dir: str | None = None, control: str | None = None,
           split: Mapping[str, float] | None = None, identity: str = "user",
           on_bad_rows: str = "error", plots: bool = True) -> dict[str, Any]:
    """Reads ``events_dir``, computes the report; with ``out_dir`` writes ``report.json``,
    ``report.md`` and (``plots``) ``ctr_over_time.png``. Returns ``{"result", "text",
    "files"}``."""
    bad = BadRows(on_bad_rows)
    log = events_lib.collect(events_dir, bad_rows=bad, identity=identity)
    result = analyze(log, control=control, split=split,
                     platforms=slot_platforms(events_dir, log))
    result["events_dir"] = str(events_dir)
    result["bad_lines_skipped"] = len(bad)
    files: list[Path] = []
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pngs = plot_over_time(log, result, out) if plots else []
        (out / "report.json").write_text(json.dumps(jsonable(result), indent=2) + "\n")
        (out / "report.md").write_text(markdown(result, [str(p) for p in pngs]))
        files = [out / "report.json", out / "report.md", *pngs]
    return {"result": result, "text": text(result), "files": files}


def parse_split(s: str | None, arms_hint: Sequence[str] = ()) -> dict[str, float] | None:
    """``control=50,treatment=50`` (or ``50,50`` with ``arms_hint`` naming the arms)."""
    if not s:
        return None
    parts = [p.strip() for p in s.split(",") if p.strip()]
    out: dict[str, float] = {}
    for j, p in enumerate(parts):
        name, _, w = p.rpartition("=")
        if not name:
            if j >= len(arms_hint):
                raise ReportError(f"--split {s!r}: name the arms (control=50,treatment=50)")
            name = arms_hint[j]
        try:
            out[name] = float(w)
        except ValueError:
            raise ReportError(f"--split {s!r}: {w!r} is not a number") from None
        if out[name] < 0:
            raise ReportError(f"--split {s!r}: weights must be >= 0")
    return out
