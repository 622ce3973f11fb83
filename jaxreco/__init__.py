"""jaxreco: a JAX research framework for e-commerce recommendation."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimised HLO scheduler can wedge a program that runs several
# batched LAPACK calls (the iALS row solves, jaxreco/train/ials.py): every runtime thread
# parks and block_until_ready never returns (seen with jax 0.10 on a 2-core machine, for
# some bucket shapes on every run). The default scheduler does not. Set before any backend
# starts (XLA reads XLA_FLAGS once); a value the user set explicitly is left alone.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=false").strip()
