"""jaxreco: a JAX research framework for e-commerce recommendation.

The names below are the public API; the modules behind them may move. They load lazily
(PEP 562), so ``import jaxreco`` imports neither JAX nor anything else heavy: the serving
image imports ``jaxreco.serve`` without JAX installed. Importing also changes nothing in
the process (no environment variables); a notebook that trains in-process calls
:func:`configure_xla` first, as every command-line entry point does::

    import jaxreco
    jaxreco.configure_xla()
    cfg = jaxreco.compose_config(["debug=smoke"])
    metrics = jaxreco.train_and_evaluate(cfg, "outputs/notebook")
    jaxreco.export_run("outputs/notebook", "models/nb", version=1)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "configure_xla": "jaxreco.runtime",
    "compose_config": "jaxreco.runtime",
    "train_and_evaluate": "jaxreco.train.loop",
    "restore_run": "jaxreco.run",
    "evaluate_run": "jaxreco.run",
    "export_run": "jaxreco.export",
    "export_saved_model": "jaxreco.export",
    "prepare": "jaxreco.data.prepare",
    "load_split": "jaxreco.data.prepare",
    "load_table": "jaxreco.data.prepare",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time __getattr__ does this
    from jaxreco.data.prepare import load_split, load_table, prepare
    from jaxreco.export import export_run, export_saved_model
    from jaxreco.run import evaluate_run, restore_run
    from jaxreco.runtime import compose_config, configure_xla
    from jaxreco.train.loop import train_and_evaluate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxreco' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value          # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
