"""``jaxreco-serve``: the HTTP service for an exported model directory.

    jaxreco-serve --model-dir models/ml1m --model-name ml1m [--rules rules.json]

Every flag has an environment variable (``JAXRECO_SERVE_<FLAG>``, e.g.
``JAXRECO_SERVE_PORT``); a flag wins over its variable. Listens on 127.0.0.1 unless told
otherwise (the container image sets ``JAXRECO_SERVE_HOST=0.0.0.0``).

This entry point imports TensorFlow, never JAX: the serving image has no JAX. It lives in
``jaxreco.serve`` rather than ``jaxreco.cli`` because ``jaxreco.cli`` imports the training
stack (omegaconf, the data package), which the serving image does not install.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _env(name: str, default):
    return os.environ.get(f"JAXRECO_SERVE_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxreco-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=_env("MODEL_DIR", None),
                   help="directory holding version subdirectories <model_dir>/<version>/ "
                        "(env JAXRECO_SERVE_MODEL_DIR)")
    p.add_argument("--model-name", default=_env("MODEL_NAME", "jaxreco"),
                   help="name in /v1/models/<name> (default jaxreco)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=int(_env("PORT", 8501)),
                   help="default 8501 (TF Serving's REST port)")
    p.add_argument("--rules", default=_env("RULES", None),
                   help="business rules JSON file (see jaxreco.serve.rules)")
    p.add_argument("--poll-interval", type=float, default=float(_env("POLL_INTERVAL", 5.0)),
                   help="seconds between checks for a new model version (default 5)")
    p.add_argument("--max-batch", type=int, default=int(_env("MAX_BATCH", 64)),
                   help="most ids in one request (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", 65536)),
                   help="larger request bodies get 413 (default 65536)")
    p.add_argument("--limit-concurrency", type=int, default=int(_env("LIMIT_CONCURRENCY", 256)),
                   help="connections+requests in flight before answering 503 (default 256)")
    p.add_argument("--access-log", action="store_true",
                   default=_env("ACCESS_LOG", "0") not in ("0", "", "false"),
                   help="log every request (off by default: it costs throughput)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model_dir:
        print("jaxreco-serve: --model-dir (or JAXRECO_SERVE_MODEL_DIR) is required", file=sys.stderr)
        return 2
    for flag, v in (("--max-batch", args.max_batch), ("--max-body-bytes", args.max_body_bytes),
                    ("--limit-concurrency", args.limit_concurrency)):
        if v < 1:
            print(f"jaxreco-serve: {flag} must be positive; got {v}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import uvicorn

    from jaxreco.serve.app import ServeConfig, create_app
    from jaxreco.serve.model import ModelManager
    from jaxreco.serve.rules import BusinessRules, RulesError

    try:
        rules = BusinessRules.load(args.rules) if args.rules else None
    except RulesError as e:
        print(f"jaxreco-serve: {e}", file=sys.stderr)
        return 2
    manager = ModelManager(args.model_dir, rules=rules, max_batch=args.max_batch,
                           poll_interval_s=args.poll_interval)
    app = create_app(manager, ServeConfig(model_name=args.model_name, max_batch=args.max_batch,
                                          max_body_bytes=args.max_body_bytes))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                access_log=args.access_log, limit_concurrency=args.limit_concurrency,
                timeout_keep_alive=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
