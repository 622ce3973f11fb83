"""Privacy accounting by ``dp-accounting`` (Google's maintained library; nothing hand-written).

A DP iALS run releases one Gaussian mechanism per epoch (the noisy item statistics, see
:mod:`jaxreco.privacy.dp_ials`), each with noise multiplier ``z = σ / Δ`` (``Δ`` the L2
sensitivity of one user's contribution), adaptively composed over the epochs:
``SelfComposedDpEvent(GaussianDpEvent(z), epochs)``. The neighbouring relation is
add-or-remove one user's whole history (user-level DP), dp-accounting's default.

A DP-SGD run (:mod:`jaxreco.privacy.dp_sgd`) releases one Gaussian mechanism per step on
a Poisson sample of the users (each user in with probability ``q``):
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)``; the
``sampling_rate`` argument below is that ``q`` (1: every user, as in DP iALS).

``epsilon`` gives ε at δ for a noise multiplier; ``noise_multiplier`` calibrates the
multiplier that reaches a target ε (``dp_accounting.calibrate_dp_mechanism``, Brent's method
over the accountant).
"""

from __future__ import annotations

import functools
import math

ACCOUNTANTS = ("rdp", "pld")


def _lib():
    """``dp_accounting``, an optional dependency (``pip install 'jaxreco[privacy]'``)."""
    try:
        import dp_accounting
    except ImportError as e:
        raise ImportError("privacy=dp needs dp-accounting: pip install 'jaxreco[privacy]'") from e
    return dp_accounting


def _accountant(kind: str):
    if kind == "rdp":
        from dp_accounting import rdp
        return rdp.RdpAccountant()
    if kind == "pld":
        from dp_accounting import pld
        return pld.PLDAccountant(value_discretization_interval=1e-3)
    raise ValueError(f"privacy.accountant={kind!r}: must be one of {ACCOUNTANTS}")


def event(noise_multiplier: float, steps: int, sampling_rate: float = 1.0):
    """``steps`` Gaussian mechanisms of multiplier ``noise_multiplier``, each on a Poisson
    sample of rate ``sampling_rate`` (1: on everyone), composed (a ``dp_accounting.DpEvent``)."""
    dpa = _lib()
    one = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        one = dpa.PoissonSampledDpEvent(float(sampling_rate), one)
    return dpa.SelfComposedDpEvent(one, int(steps))


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp",
            sampling_rate: float = 1.0) -> float:
    """ε at ``delta`` after ``steps`` Gaussian releases of multiplier ``noise_multiplier``
    on Poisson samples of rate ``sampling_rate`` (``inf`` for multiplier 0: no noise, no
    privacy)."""
    _check(steps, delta, sampling_rate)
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier {noise_multiplier}: must be >= 0")
    if noise_multiplier == 0:
        return math.inf
    _lib()
    acc = _accountant(accountant)
    acc.compose(event(noise_multiplier, steps, sampling_rate))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def noise_multiplier(target_epsilon: float, steps: int, delta: float,
                     accountant: str = "rdp", sampling_rate: float = 1.0) -> float:
    """The smallest noise multiplier whose ``steps`` releases (on Poisson samples of rate
    ``sampling_rate``) are ``(target_epsilon, delta)``-DP by the accountant
    (``dp_accounting.calibrate_dp_mechanism``)."""
    _check(steps, delta, sampling_rate)
    if not target_epsilon > 0:
        raise ValueError(f"privacy.epsilon={target_epsilon}: must be > 0")
    if math.isinf(target_epsilon):
        return 0.0
    dp_accounting = _lib()
    z_rdp = float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant("rdp"), lambda z: event(z, steps, sampling_rate), target_epsilon,
        delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-5))
    if accountant == "rdp":
        return z_rdp
    # PLD is tighter than RDP (a smaller multiplier reaches the same ε): search below the
    # RDP answer, never at multipliers so small that the PLD grid explodes
    _accountant(accountant)
    lo = max(0.5 * z_rdp, 0.2)
    if epsilon(lo, steps, delta, accountant, sampling_rate) <= target_epsilon:
        return lo
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda z: event(z, steps, sampling_rate),
        target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, z_rdp), tol=1e-4))


def _check(steps: int, delta: float, sampling_rate: float = 1.0) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling rate {sampling_rate}: must be in (0, 1]")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"{steps!r} releases: must be an integer >= 1")
    if not 0 < delta < 1:
        raise ValueError(f"privacy.delta={delta}: must be in (0, 1)")
