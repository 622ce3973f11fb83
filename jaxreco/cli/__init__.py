"""Command-line entry points (thin: parse config, call a library function)."""

from __future__ import annotations

import contextlib
import logging
import sys

from hydra.errors import HydraException
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


@contextlib.contextmanager
def user_errors():
    """Turns errors caused by the user's data or config into one line and exit status 2."""
    try:
        yield
    except (DataError, HydraException, OmegaConfBaseException, ValueError, FileNotFoundError) as e:
        msg = str(e).split("\nConfig search path")[0].strip()
        cause = e.__cause__
        if cause is not None and str(cause).split("\n")[0] not in msg:
            msg += f": {str(cause).splitlines()[0]}"
        if logging.getLogger().handlers:       # inside a Hydra job: also into the run's log
            logging.getLogger("jaxreco").error(msg)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
