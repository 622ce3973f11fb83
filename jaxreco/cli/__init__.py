"""Command-line entry points (thin: parse config, call a library function)."""

from __future__ import annotations

import contextlib
import difflib
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxreco.data.dataset import DataError
from jaxreco.runtime import conf_dir

# The packaged configs (jaxreco/conf/ in a wheel, the top-level conf/ in a checkout), or
# $JAXRECO_CONF_DIR; see jaxreco.runtime.conf_dir.
CONF_DIR = conf_dir()


def quiet_libraries() -> None:
    """Keeps Orbax/absl INFO chatter out of the run log."""
    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line(e: BaseException) -> str:
    """An error's message in one line: Hydra's search-path dump and its "To append … use
    +key" hint dropped (a key the schema lacks cannot be added), listed options joined."""
    text = str(e).split("\nConfig search path")[0].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    msg = lines[0]
    rest = lines[1:]
    if rest and rest[0].startswith("To append to your config use"):
        msg = msg.rstrip(".")
        if ": " in rest[0]:
            msg += ": " + rest[0].split(": ", 1)[1]
        rest = rest[1:]
    if rest and rest[0].startswith("Available options"):
        msg = msg.rstrip(".") + f"; {rest[0].rstrip(':').lower()}: " + ", ".join(rest[1:])
    cause = e.__cause__
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in msg:
        msg += f": {str(cause).splitlines()[0]}"
    return msg


@contextlib.contextmanager
def user_errors(log_to_run: bool = True):
    """Turns errors caused by the user's data or config into one line and exit status 2."""
    try:
        yield
    except (DataError, HydraException, OmegaConfBaseException, ValueError, FileNotFoundError,
            FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        msg = one_line(e)
        if log_to_run and logging.getLogger().handlers:   # inside a Hydra job: the run's log
            logging.getLogger("jaxreco").error(msg)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


# Hydra flags that change what a command does (no single config is composed up front).
_NO_PRECHECK = ("-m", "--multirun", "--cfg", "-c", "--help", "-h", "--hydra-help", "--info",
                "-i", "--shell-completion", "-sc", "--resolve", "--package", "-p")


def _key_known(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` exists in ``cfg``, or may be added (its parent is a free-form dict)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        return False
    if leaf in parent:
        return True
    return parent._metadata.object_type in (None, dict)       # a dict[str, ...] field


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items_ex(resolve=False):
        out.append(prefix + str(k))
        if isinstance(v, DictConfig):
            out += _all_keys(v, f"{prefix}{k}.")
    return out


def precheck(config_name: str, argv: list[str]) -> None:
    """Composes ``config_name`` with the command line's overrides before Hydra runs, so a
    config mistake ends in one line and exit status 2 (Hydra itself prints several lines and
    exits 1); rejects ``+key=value`` where the schema has no such key (Hydra would add it,
    and the run would store the typo in its config.yaml). Then ``jaxreco.config.validate``.
    Multirun, ``--cfg`` and the other Hydra modes are left to Hydra."""
    from jaxreco import config as config_lib        # registers the schemas

    if any(a in _NO_PRECHECK or a.split("=")[0] in _NO_PRECHECK for a in argv):
        return
    for a in argv:
        if a.startswith("hydra.run.dir="):
            d = Path(a.split("=", 1)[1])
            if d.exists() and not d.is_dir():
                with user_errors(log_to_run=False):
                    raise ValueError(f"{a}: {d} exists and is not a directory")
    overrides = [a for a in argv if not a.startswith("-")
                 and not a.lstrip("+~").startswith("hydra.")]
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    with user_errors(log_to_run=False):
        config_lib.register()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            base = compose(config_name, overrides=[o for o in overrides
                                                   if not (o.startswith("+")
                                                           and not o.startswith("++"))])
            for o in overrides:
                if not o.startswith("+") or o.startswith("++") or "=" not in o:
                    continue
                key = o[1:].split("=", 1)[0]
                if key.split("/")[0] in groups or _key_known(base, key):
                    continue
                close = difflib.get_close_matches(key, _all_keys(base), n=1)
                raise ValueError(f"{o}: {key!r} is not a config key" + (
                    f" (did you mean {close[0]}?)" if close else ""))
            cfg = compose(config_name, overrides=overrides)
        OmegaConf.set_struct(cfg, False)
        cfg.name = cfg.get("name") if not OmegaConf.is_interpolation(cfg, "name") else "check"
        config_lib.validate(cfg)
