"""``python -m jaxreco.serve``: same as ``jaxreco-serve``."""

import sys

from jaxreco.serve.cli import main

sys.exit(main())
