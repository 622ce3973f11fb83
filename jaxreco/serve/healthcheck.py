"""``python -m jaxreco.serve.healthcheck [PATH]``: exit 0 if the local server answers 200.

The container's HEALTHCHECK (the slim image has no curl). Asks 127.0.0.1 on
``JAXRECO_SERVE_PORT`` (default 8501), path ``/readyz`` unless given.
"""

import os
import sys
import urllib.request


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "/readyz"
    port = os.environ.get("JAXRECO_SERVE_PORT", "8501")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=4) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:
        print(f"healthcheck {path}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
