"""`jaxreco-report --events DIR [--out DIR]`: the online A/B report from collected events.

    jaxreco-report --events /var/jaxreco/events
    jaxreco-report --events gs://bucket/events --out /tmp/ab --control control --split control=50,treatment=50

Prints, per arm, impressions, users, CTR, add-to-cart rate, conversion rate and revenue per
impression with 95% intervals (delta method, clustered by shopper), each arm's lift over the
control arm (the first arm, or ``--control``) with its interval and p-value, and a
sample-ratio-mismatch check; with ``--out`` also writes ``report.json``, ``report.md`` and
``ctr_over_time.png`` (plots need matplotlib: ``pip install 'jaxreco[sweep]'``). Method:
``jaxreco/report.py``. Bad input: one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from jaxreco.data.dataset import DataError
from jaxreco.report import ReportError, parse_split, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jaxreco-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", required=True, metavar="DIR",
                   help="the server's --events-dir (local directory or fsspec URL)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write report.json, report.md and plots here (default: print only)")
    p.add_argument("--control", default=None, help="the control arm (default: the first arm)")
    p.add_argument("--split", default=None,
                   help="traffic split for the sample-ratio check, e.g. control=50,treatment=50 "
                        "(default: the split the server recorded, else equal)")
    p.add_argument("--identity", default="user", choices=["user", "session"],
                   help="cluster impressions by user (session where anonymous; default) or "
                        "by session")
    p.add_argument("--on-bad-rows", default="error", choices=["error", "skip"],
                   help="a malformed line stops the report (default) or is skipped and counted")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    a = p.parse_args(argv)
    plots = a.out is not None and not a.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: plots skipped: matplotlib is not installed "
                  "(pip install 'jaxreco[sweep]')", file=sys.stderr)
            plots = False
    try:
        res = report(a.events, out_dir=a.out, control=a.control, split=parse_split(a.split),
                     identity=a.identity, on_bad_rows=a.on_bad_rows, plots=plots)
    except (DataError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["text"])
    if res["result"]["bad_lines_skipped"]:
        print(f"\n{res['result']['bad_lines_skipped']} malformed lines skipped")
    if res["files"]:
        print("\nwrote " + ", ".join(str(f) for f in res["files"]))
    else:
        print("\n(pass --out DIR to write report.json, report.md and plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
