"""``jaxreco-serve``: the HTTP service for an exported model directory.

    jaxreco-serve --model-dir models/ml1m --model-name ml1m [--rules rules.json]
    jaxreco-serve --model-dir models/ml1m --arm control=3 --arm treatment=4 --split 50,50 \
        --salt exp-2026-12 --events-dir /var/lib/jaxreco/events --replica-id r0

Slow clients are cut off (``--header-timeout``, ``--body-timeout``, 408) and each source
address may hold at most ``--max-connections-per-client`` connections
(:mod:`jaxreco.serve.guard`); ``--limit-concurrency`` counts requests whose body has
arrived, so slow clients never use it up.

Every flag has an environment variable (``JAXRECO_SERVE_<FLAG>``, e.g.
``JAXRECO_SERVE_PORT``; ``JAXRECO_SERVE_ARMS="control=3,treatment=4"``), except
``--events-dir`` (``JAXRECO_EVENTS_DIR``) and ``--replica-id`` (``JAXRECO_REPLICA_ID``,
default: the host name); a flag wins over its variable. Listens on 127.0.0.1 unless told
otherwise (the container image sets ``JAXRECO_SERVE_HOST=0.0.0.0``).

This entry point imports TensorFlow, never JAX: the serving image has no JAX. It lives in
``jaxreco.serve`` rather than ``jaxreco.cli`` because ``jaxreco.cli`` imports the training
stack (omegaconf, the data package), which the serving image does not install.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from jaxreco.serve import ab as ab_lib
from jaxreco.serve import layout


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
                   help="requests in flight (whole body received) before answering 503 "
                        "(default 256; /healthz, /readyz, /metrics are never refused)")
    g = p.add_argument_group("slow and greedy clients")
    g.add_argument("--header-timeout", type=float, default=float(_env("HEADER_TIMEOUT", 10.0)),
                   help="seconds a client has to send a request's line and headers, from the "
                        "connection's opening (first request) or the request's first byte; "
                        "then 408 and close (default 10)")
    g.add_argument("--body-timeout", type=float, default=float(_env("BODY_TIMEOUT", 30.0)),
                   help="seconds a client has to send a request body once its headers are in; "
                        "then 408 and close (default 30)")
    g.add_argument("--keep-alive-timeout", type=float,
                   default=float(_env("KEEP_ALIVE_TIMEOUT", 30.0)),
                   help="seconds an idle keep-alive connection stays open between requests "
                        "(default 30)")
    g.add_argument("--max-connections-per-client", type=int,
                   default=int(_env("MAX_CONNECTIONS_PER_CLIENT", 64)),
                   help="open connections per source address; more get 503 and are closed "
                        "(default 64; behind a proxy every client is the proxy's address: raise "
                        "it to --max-connections)")
    g.add_argument("--max-connections", type=int, default=int(_env("MAX_CONNECTIONS", 1024)),
                   help="open connections in all; more get 503 and are closed (default 1024)")
    p.add_argument("--access-log", action="store_true",
                   default=_env("ACCESS_LOG", "0") not in ("0", "", "false"),
                   help="log every request (off by default: it costs throughput)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    g = p.add_argument_group("A/B test")
    env_arms = _env("ARMS", "")
    g.add_argument("--arm", action="append", dest="arms", metavar="NAME=VERSION",
                   default=None, help="an arm serving a pinned model version; repeat per arm "
                   "(env JAXRECO_SERVE_ARMS=\"control=3,treatment=4\"). Without arms: one arm, "
                   "'default', serving the newest version with hot reload")
    p.set_defaults(env_arms=[a.strip() for a in env_arms.split(",") if a.strip()])
    g.add_argument("--split", default=_env("SPLIT", None),
                   help="traffic weights, one per arm, e.g. 50,50 (default: equal)")
    g.add_argument("--salt", default=_env("SALT", ""),
                   help="mixed into the assignment hash; a new salt reshuffles shoppers over "
                        "the arms (one per experiment)")
    g = p.add_argument_group("promotions (POST /offers, /redeem, coupon_boost)")
    g.add_argument("--promotions", default=_env("PROMOTIONS", None),
                   help="promotions catalogue, a JSON file or http(s) URL (jaxreco.promotions); "
                        "re-read every --poll-interval seconds, an invalid new one keeps the old")
    g.add_argument("--uplift-model-dir", default=_env("UPLIFT_MODEL_DIR", None),
                   help="exported uplift model (experiment=synthetic_coupons); default "
                        "<model-dir>/uplift when it exists")
    g.add_argument("--redemptions", default=_env("REDEMPTIONS", None),
                   help="JSON-lines ledger of POST /redeem (budgets spent), replayed at start")
    g = p.add_argument_group("events")
    g.add_argument("--events-dir", default=os.environ.get("JAXRECO_EVENTS_DIR") or None,
                   help="directory of the event log (served records and POST /events), shared "
                        "by the replicas (env JAXRECO_EVENTS_DIR); without it no events are "
                        "collected")
    g.add_argument("--replica-id", default=os.environ.get("JAXRECO_REPLICA_ID") or None,
                   help="names this server's segments (env JAXRECO_REPLICA_ID; default: the "
                        "host name); unique per live server")
    g.add_argument("--segment-bytes", type=int, default=int(_env("SEGMENT_BYTES", 64 * 2**20)),
                   help="close a segment once it is this large (default 64 MiB)")
    g.add_argument("--segment-seconds", type=float, default=float(_env("SEGMENT_SECONDS", 300)),
                   help="close a segment this old (default 300)")
    g.add_argument("--dedup-ids", type=int, default=int(_env("DEDUP_IDS", 1_000_000)),
                   help="event ids remembered to drop duplicates (default 1000000, ~150 MB)")
    g.add_argument("--dedup-seconds", type=float, default=float(_env("DEDUP_SECONDS", 86400)),
                   help="and only those of the last this many seconds (default 86400)")
    g.add_argument("--max-events", type=int, default=int(_env("MAX_EVENTS", 1000)),
                   help="most events in one POST /events (default 1000)")
    g.add_argument("--max-events-body-bytes", type=int,
                   default=int(_env("MAX_EVENTS_BODY_BYTES", 2 * 2**20)),
                   help="larger POST /events bodies get 413 (default 2 MiB)")
    return p


def ab_config(args) -> ab_lib.ABConfig:
    """The arms the parsed flags ask for (``--arm`` wins over ``JAXRECO_SERVE_ARMS``)."""
    return ab_lib.build(args.arms if args.arms else args.env_arms, args.split, args.salt)


def _versions(model_dir: str) -> list[int]:
    try:
        names = os.listdir(model_dir)
    except OSError:
        return []
    return sorted(int(n) for n in names if layout.is_version_dir_name(n)
                  and os.path.exists(os.path.join(model_dir, n, "saved_model.pb")))


def _missing_versions(model_dir: str, versions: list[int]) -> list[int]:
    there = set(_versions(model_dir))
    return [v for v in versions if v not in there]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model_dir:
        print("jaxreco-serve: --model-dir (or JAXRECO_SERVE_MODEL_DIR) is required", file=sys.stderr)
        return 2
    for flag, v in (("--max-batch", args.max_batch), ("--max-body-bytes", args.max_body_bytes),
                    ("--limit-concurrency", args.limit_concurrency),
                    ("--header-timeout", args.header_timeout),
                    ("--body-timeout", args.body_timeout),
                    ("--keep-alive-timeout", args.keep_alive_timeout),
                    ("--max-connections-per-client", args.max_connections_per_client),
                    ("--max-connections", args.max_connections),
                    ("--segment-bytes", args.segment_bytes),
                    ("--segment-seconds", args.segment_seconds), ("--dedup-ids", args.dedup_ids),
                    ("--dedup-seconds", args.dedup_seconds), ("--max-events", args.max_events),
                    ("--max-events-body-bytes", args.max_events_body_bytes)):
        if not v > 0:
            print(f"jaxreco-serve: {flag} must be positive; got {v}", file=sys.stderr)
            return 2
    try:
        ab = ab_config(args)
    except ab_lib.ABError as e:
        print(f"jaxreco-serve: {e}", file=sys.stderr)
        return 2
    missing = _missing_versions(args.model_dir, ab.pinned_versions)
    if missing:  # before TensorFlow is imported: a wrong --arm fails in a second
        arms = [f"{a.name}={a.version}" for a in ab.arms if a.version in missing]
        print(f"jaxreco-serve: arm(s) {arms} pin version(s) {missing}, which are not under "
              f"{args.model_dir} (versions there: {_versions(args.model_dir)}); export them "
              "first or fix --arm", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from jaxreco.serve.events import EventLog, EventLogError
    from jaxreco.serve.rules import BusinessRules, RulesError

    try:
        rules = BusinessRules.load(args.rules) if args.rules else None
    except RulesError as e:
        print(f"jaxreco-serve: {e}", file=sys.stderr)
        return 2
    event_log = None
    if args.events_dir:  # recovers this replica's segments; fails before TensorFlow loads
        try:
            event_log = EventLog(
                args.events_dir, args.replica_id or socket.gethostname(),
                segment_bytes=args.segment_bytes, segment_seconds=args.segment_seconds,
                dedup_ids=args.dedup_ids, dedup_seconds=args.dedup_seconds)
            event_log.start()
        except EventLogError as e:
            print(f"jaxreco-serve: {e}", file=sys.stderr)
            return 2

    import uvicorn

    from jaxreco.serve.app import ServeConfig, create_app
    from jaxreco.serve.model import ModelManager  # imports TensorFlow, its log quietened
    from jaxreco.serve.guard import GuardConfig, guarded_protocol

    manager = ModelManager(args.model_dir, rules=rules, max_batch=args.max_batch,
                           poll_interval_s=args.poll_interval, pinned=ab.pinned_versions)
    offers = None
    if args.promotions:
        from jaxreco.promotions import CatalogueError, CatalogueWatcher
        from jaxreco.serve.offers import BudgetLedger, OfferError, OffersService, UPLIFT_SUBDIR
        uplift_dir = args.uplift_model_dir or os.path.join(args.model_dir, UPLIFT_SUBDIR)
        try:
            offers = OffersService(
                CatalogueWatcher(args.promotions), BudgetLedger(args.redemptions),
                ModelManager(uplift_dir, max_batch=args.max_batch,
                             poll_interval_s=args.poll_interval)
                if os.path.isdir(uplift_dir) else None, poll_interval_s=args.poll_interval)
        except (CatalogueError, OfferError) as e:
            print(f"jaxreco-serve: {e}", file=sys.stderr)
            return 2
    app = create_app(manager, ServeConfig(model_name=args.model_name, max_batch=args.max_batch,
                                          max_body_bytes=args.max_body_bytes,
                                          max_events=args.max_events,
                                          max_events_body_bytes=args.max_events_body_bytes,
                                          limit_concurrency=args.limit_concurrency),
                     ab=ab, event_log=event_log, offers=offers)
    guard = app.state.metrics.guard
    protocol = guarded_protocol(
        GuardConfig(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                    max_connections_per_client=args.max_connections_per_client,
                    max_connections=args.max_connections),
        on_event=lambda reason: guard.labels(reason).inc())
    # limit_concurrency is the application's (ConcurrencyLimitMiddleware: JSON 503s, counted
    # once the body is in); uvicorn's own would count slow connections too. No WebSockets.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                access_log=args.access_log, http=protocol, ws="none",
                timeout_keep_alive=args.keep_alive_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
