"""``python -m jaxreco.cli.serve``: same as ``jaxreco-serve`` (:mod:`jaxreco.serve.cli`).

The console script points at :func:`jaxreco.serve.cli.main` directly, because importing
the ``jaxreco.cli`` package pulls in the training stack, which the serving image lacks.
"""

import sys

from jaxreco.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
