"""A/B assignment: which arm (a pinned model version) serves a shopper.

A shopper's arm is a pure function of the experiment's salt, its split and a key -- the
user id, or the ``session`` id of an anonymous shopper:

    h   = the first 8 bytes of sha256(utf8(salt + ":" + key)), as a big-endian integer
    u   = h / 2**64                                   (uniform in [0, 1))
    arm = the first i with u < (w_0 + ... + w_i) / (w_0 + ... + w_{n-1})

so the assignment is sticky (the same key gets the same arm on every replica, after every
restart), the arms' shares follow the weights ``w``, and a new salt draws an assignment
independent of the old one. Stdlib only, so the report side can recompute it
(:meth:`ABConfig.assign`).

Without arms the server runs one arm, ``default``, that serves the newest version (hot
reload as before); its version is ``None`` here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Sequence

DEFAULT_ARM = "default"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class ABError(ValueError):
    """A bad ``--arm`` / ``--split`` / ``--salt``; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    version: int | None  # None: the newest version under --model-dir (the default arm)


@dataclasses.dataclass(frozen=True)
class ABConfig:
    arms: tuple[Arm, ...]
    split: tuple[float, ...]  # one weight per arm, as given (not normalised)
    salt: str = ""

    def __post_init__(self):
        if not self.arms:
            raise ABError("an A/B configuration needs at least one arm")
        if len(self.split) != len(self.arms):
            raise ABError(f"--split has {len(self.split)} weights for {len(self.arms)} arms "
                          f"{[a.name for a in self.arms]}; give one weight per arm")
        total = sum(self.split)
        if total <= 0:
            raise ABError(f"--split {list(self.split)}: the weights must add up to more than 0")
        acc, cum = 0.0, []
        for w in self.split:
            acc += w
            cum.append(acc / total)
        object.__setattr__(self, "_cum", tuple(cum))

    @classmethod
    def default(cls) -> "ABConfig":
        return cls((Arm(DEFAULT_ARM, None),), (100.0,), "")

    @property
    def is_default(self) -> bool:
        return self.arms == (Arm(DEFAULT_ARM, None),)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def pinned_versions(self) -> list[int]:
        """The versions the arms pin, each once, in arm order."""
        out: list[int] = []
        for a in self.arms:
            if a.version is not None and a.version not in out:
                out.append(a.version)
        return out

    def split_map(self) -> dict[str, float]:
        """``{arm: weight}`` as given (what served records and ``GET /v1/ab`` show)."""
        return {a.name: _plain(w) for a, w in zip(self.arms, self.split)}

    def assign(self, key: str) -> int:
        """Index of the arm for ``key`` (a user id, or a session id); see the module doc."""
        if len(self.arms) == 1:
            return 0
        h = int.from_bytes(hashlib.sha256(f"{self.salt}:{key}".encode()).digest()[:8], "big")
        u = h / 2.0**64
        for i, c in enumerate(self._cum):
            if u < c:
                return i
        return len(self.arms) - 1  # u within rounding of 1.0

    def describe(self) -> str:
        """One line for the start-up log."""
        arms = ", ".join(f"{a.name}=v{a.version if a.version is not None else 'newest'}"
                         f" ({_plain(w)})" for a, w in zip(self.arms, self.split))
        return f"A/B arms: {arms}; salt {self.salt!r}"


def _plain(w: float) -> float | int:
    return int(w) if float(w).is_integer() else float(w)


def parse_arms(specs: Sequence[str]) -> list[Arm]:
    """``["control=3", "treatment=4"]`` -> arms; names unique, versions positive integers."""
    arms: list[Arm] = []
    for spec in specs:
        name, sep, ver = spec.partition("=")
        name, ver = name.strip(), ver.strip()
        if not sep or not name or not ver:
            raise ABError(f"--arm {spec!r}: expected NAME=VERSION, e.g. --arm control=3")
        if not _NAME_RE.match(name):
            raise ABError(f"--arm {spec!r}: the name may hold letters, digits, '_', '.' and '-' "
                          "(at most 64 characters)")
        if not ver.isdigit() or int(ver) < 1:
            raise ABError(f"--arm {spec!r}: the version must be a positive integer (a version "
                          "directory under --model-dir)")
        if any(a.name == name for a in arms):
            raise ABError(f"--arm {spec!r}: arm {name!r} is given twice")
        arms.append(Arm(name, int(ver)))
    return arms


def parse_split(text: str | None, n_arms: int) -> tuple[float, ...]:
    """``"50,50"`` -> weights (any non-negative numbers); None or "" -> equal weights."""
    if text is None or not text.strip():
        return (1.0,) * n_arms
    out = []
    for part in text.split(","):
        try:
            w = float(part)
        except ValueError:
            raise ABError(f"--split {text!r}: {part.strip()!r} is not a number; give one "
                          "weight per arm, e.g. --split 50,50") from None
        if not w >= 0 or w == float("inf"):
            raise ABError(f"--split {text!r}: weights must be finite and >= 0; got {part.strip()}")
        out.append(w)
    return tuple(out)


def build(arm_specs: Sequence[str], split: str | None, salt: str | None) -> ABConfig:
    """The configuration the CLI runs: the default arm without ``--arm``."""
    if not arm_specs:
        if split and split.strip():
            raise ABError(f"--split {split!r} without --arm: give the arms it splits "
                          "(--arm control=3 --arm treatment=4)")
        return dataclasses.replace(ABConfig.default(), salt=salt or "")
    arms = parse_arms(arm_specs)
    return ABConfig(tuple(arms), parse_split(split, len(arms)), salt or "")
