"""TensorFlow's environment for serving, set before TensorFlow is imported (stdlib only)."""

from __future__ import annotations

import os
from typing import MutableMapping

# TF_CPP_MIN_LOG_LEVEL=2 hides TensorFlow's INFO and WARNING lines (CPU-feature notes);
# TF_ENABLE_ONEDNN_OPTS=0 hides the "oneDNN custom operations are on" notice, which ignores
# the log level (TF 2.21: nothing else silences it). The model math runs in XLA-compiled
# functions (jax2tf), which TF's oneDNN kernels do not touch; on the ML-1M-shaped bench model
# user_scores took the same time either way, within the noise of a shared 2-core VM.
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_tensorflow(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets :data:`QUIET` in ``environ``, keeping any value the user set. Effective only
    before TensorFlow is first imported in the process."""
    for name, value in QUIET.items():
        environ.setdefault(name, value)
