"""Soak test of ``jaxreco-serve`` under a slow-client attack while new versions are copied in.

    python scripts/soak_serve.py                    # 60 s, 3 versions copied file by file
    python scripts/soak_serve.py --seconds 120 --versions 5 --rate 20

Exports ``--versions + 1`` versions of a small biased-MF model with random parameters (in a
child process), serves version 1 (``--limit-concurrency 20`` and short slow-client timeouts,
as flags below), then, for ``--seconds``, all at once and all on loopback:

* **slow clients**: ``--slow-same`` connections from 127.0.0.2 (more than the server's
  ``--max-connections-per-client``), ``--slow-spread`` from as many addresses 127.0.0.10...,
  each trickling one header byte every 0.5 s, and ``--slow-body`` from 127.0.0.3 trickling a
  body; each reconnects whenever the server closes it;
* **valid traffic**: ``POST /recommend`` at ``--rate`` per second from 127.0.0.1, half on
  fresh connections, half on one kept-alive connection;
* **partial copies**: versions 2, 3, ... copied into the model directory file by file as
  ``cp -r`` does (top-level files, assets, an empty ``variables/``, then its files, the data
  file first cut in half), each waited for until ``/readyz`` names it (at most 60 s).

Prints, each on its own line (targets: 1.000 and all)::

    slow_clients_valid_success_rate: <ok / sent>
    partial_copy_versions_loaded: <loaded>/<copied>

Every loop is bounded in count and time and stops by itself; the server is stopped at the end.
``--legacy-flags`` starts the server with ``--limit-concurrency`` only (to measure a server
that predates the slow-client flags).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, ever
GUARD_FLAGS = ["--header-timeout", "3", "--body-timeout", "5", "--max-connections-per-client", "16"]


# ---------------------------------------------------------------------------- models
def export_versions(out: Path, n: int, num_users=2000, num_items=1000, dim=32) -> None:
    """``n`` versions (1..n) of a random biased-MF model, same vocabularies."""
    import numpy as np

    from jaxreco.export import biased_mf_functions, export_saved_model

    score, all_scores, _ = biased_mf_functions()
    for v in range(1, n + 1):
        rng = np.random.default_rng(v)
        params = {
            "user_embed": rng.normal(0, 0.1, (num_users, dim)).astype(np.float32),
            "item_embed": rng.normal(0, 0.1, (num_items, dim)).astype(np.float32),
            "user_bias": rng.normal(0, 0.1, (num_users, 1)).astype(np.float32),
            "item_bias": rng.normal(0, 0.1, (num_items, 1)).astype(np.float32),
            "global_bias": np.asarray(3.5, np.float32),
        }
        lens = rng.integers(5, 60, num_users)
        indices = np.concatenate([np.sort(rng.choice(num_items, k, replace=False)) for k in lens])
        export_saved_model(
            out, v, params=params, score_fn=score, user_item_scores_fn=all_scores,
            item_vectors_fn=lambda p: p["item_embed"],
            user_vocab=[str(i + 1) for i in range(num_users)],
            item_vocab=[str(i + 1) for i in range(num_items)],
            seen=(np.concatenate([[0], np.cumsum(lens)]), indices),
            model_info={"note": "random parameters, for the soak test"})


def copy_slowly(src: Path, dst: Path, gap: float, half_pause: float, stop: threading.Event) -> None:
    """``cp -r`` as a watcher sees it: top-level files, assets, an empty ``variables/``, then
    its files, the data file first cut in half."""
    dst.mkdir()
    steps = [("file", f) for f in sorted(p for p in src.iterdir() if p.is_file())]
    steps += [("tree", src / d) for d in ("assets", "assets.extra")]
    steps += [("mkdir", dst / "variables"), ("file", src / "variables" / "variables.index")]
    for kind, p in steps:
        if kind == "file":
            shutil.copy(p, dst / p.relative_to(src))
        elif kind == "tree":
            shutil.copytree(p, dst / p.name)
        else:
            p.mkdir()
        stop.wait(gap)
    for data in sorted((src / "variables").glob("variables.data-*")):
        blob = data.read_bytes()
        with open(dst / "variables" / data.name, "wb") as f:
            f.write(blob[: len(blob) // 2])
        stop.wait(half_pause)
        with open(dst / "variables" / data.name, "ab") as f:
            f.write(blob[len(blob) // 2:])


# ---------------------------------------------------------------------------- clients
def _get(port: int, path: str, timeout: float = 5) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (OSError, ValueError):
        return 0, {}


def slow_client(src: str, port: int, head: bytes, trickle: bytes, until: float,
                out: list, lock: threading.Lock) -> None:
    """Trickles ``trickle`` one byte every 0.5 s after ``head``; reconnects when closed."""
    for _ in range(500):
        if time.monotonic() >= until - 0.5:
            return
        opened = time.monotonic()
        reply, closed = b"", None
        try:
            s = socket.socket()
            s.bind((src, 0))
            s.settimeout(0.5)
            s.connect((HOST, port))
            s.sendall(head)
        except OSError:
            time.sleep(0.2)
            continue
        i = 0
        with s:
            while time.monotonic() < until:
                try:
                    chunk = s.recv(65536)
                    if not chunk:
                        closed = time.monotonic()
                        break
                    reply += chunk
                    continue
                except socket.timeout:
                    pass
                except OSError:
                    closed = time.monotonic()
                    break
                try:
                    s.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
                    i += 1
                except OSError:
                    closed = time.monotonic()
                    break
        with lock:
            out.append({"src": src, "life": (closed or time.monotonic()) - opened,
                        "closed": closed is not None, "status": reply[9:12].decode() or "-"})


def valid_traffic(port: int, rate: float, until: float, users: int) -> list[int]:
    statuses, keep, rnd = [], None, random.Random(0)
    n = 0
    t0 = time.monotonic()
    while time.monotonic() < until and n < int(rate * (until - t0)) + 1:
        body = json.dumps({"user": str(rnd.randint(1, users)), "k": 10})
        fresh = n % 2 == 0
        try:
            if fresh:
                conn = http.client.HTTPConnection(HOST, port, timeout=10)
            else:
                keep = keep or http.client.HTTPConnection(HOST, port, timeout=10)
                conn = keep
            conn.request("POST", "/recommend", body=body)
            r = conn.getresponse()
            data = json.loads(r.read())
            ok = r.status == 200 and len(data["results"][0]["items"]) == 10
            statuses.append(200 if ok else r.status or -1)
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            statuses.append(0)
            if not fresh and keep is not None:
                keep.close()
                keep = None
        if fresh:
            conn.close()
        n += 1
        time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
    if keep is not None:
        keep.close()
    return statuses


# ---------------------------------------------------------------------------- the run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run(args, tmp: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    staging, model_dir = tmp / "staging", tmp / "models"
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--export-to", str(staging),
                    "--versions", str(args.versions)], check=True, env=env, timeout=600)
    print(f"# exported {args.versions + 1} versions in {time.perf_counter() - t:.0f} s", flush=True)
    model_dir.mkdir()
    shutil.move(str(staging / "1"), str(model_dir / "1"))
    port = _free_port()
    flags = [] if args.legacy_flags else GUARD_FLAGS
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jaxreco.serve", "--model-dir", str(model_dir), "--host", HOST,
             "--port", str(port), "--poll-interval", "0.5", "--limit-concurrency", "20",
             "--log-level", "warning", *flags], env=env, cwd=str(REPO), stdout=log,
            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while _get(port, "/readyz")[0] != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        print(f"# server pid {server.pid} on {HOST}:{port}, flags {' '.join(flags) or '(legacy)'}",
              flush=True)
        until = time.monotonic() + args.seconds
        slow, lock, stop = [], threading.Lock(), threading.Event()
        head = b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        trickle = b"X-Slow: " + b"a" * 64
        body = json.dumps({"user": "1", "k": 10}).encode()
        body_head = head + b"Content-Length: %d\r\n\r\n" % len(body)
        attackers = ([("127.0.0.2", head, trickle)] * args.slow_same
                     + [(f"127.0.0.{10 + i}", head, trickle) for i in range(args.slow_spread)]
                     + [("127.0.0.3", body_head, body)] * args.slow_body)
        copied, loaded = [], []

        def copier():
            for v in range(2, args.versions + 2):
                if time.monotonic() > until - 5:
                    break
                copy_slowly(staging / str(v), model_dir / str(v), 0.5, 2.0, stop)
                copied.append(v)
                wait_until = min(until, time.monotonic() + 60)
                while time.monotonic() < wait_until and not stop.is_set():
                    if _get(port, "/readyz")[1].get("model_version") == v:
                        loaded.append(v)
                        break
                    time.sleep(0.2)

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(attackers) + 2) as pool:
            jobs = [pool.submit(slow_client, src, port, h, tr, until, slow, lock)
                    for src, h, tr in attackers]
            copy_job = pool.submit(copier)
            time.sleep(1.0)  # the attack first
            statuses = valid_traffic(port, args.rate, until, 2000)
            stop.set()
            for j in jobs + [copy_job]:
                j.result(timeout=args.seconds + 120)
        ok = sum(s == 200 for s in statuses)
        by_status: dict[str, int] = {}
        for c in slow:
            by_status[c["status"]] = by_status.get(c["status"], 0) + 1
        longest = max((c["life"] for c in slow if c["closed"]), default=0.0)
        still_open = sum(not c["closed"] for c in slow)
        print(f"# valid requests: {len(statuses)} sent, {ok} answered 200, others "
              f"{sorted(set(statuses) - {200})}")
        print(f"# slow connections: {len(slow)} opened from {len(attackers)} attackers; answers "
              f"{dict(sorted(by_status.items()))}; longest closed after {longest:.1f} s; "
              f"{still_open} open when the attack stopped")
        print(f"# versions copied {copied}, served {loaded}; served at the end: "
              f"{_get(port, '/readyz')[1].get('model_version')}")
        print(f"slow_clients_valid_success_rate: {ok / max(1, len(statuses)):.3f} "
              f"({ok}/{len(statuses)})")
        print(f"partial_copy_versions_loaded: {len(loaded)}/{len(copied)}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        if args.show_log:
            print(log_path.read_text()[-4000:])
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the attack (default 60)")
    p.add_argument("--versions", type=int, default=3, help="versions copied in (default 3)")
    p.add_argument("--rate", type=float, default=10.0, help="valid requests per second (default 10)")
    p.add_argument("--slow-same", type=int, default=20,
                   help="slow connections from 127.0.0.2 (default 20; the server allows 16)")
    p.add_argument("--slow-spread", type=int, default=10,
                   help="slow connections from as many addresses (default 10)")
    p.add_argument("--slow-body", type=int, default=5, help="slow-body connections (default 5)")
    p.add_argument("--legacy-flags", action="store_true",
                   help="start the server without the slow-client flags")
    p.add_argument("--show-log", action="store_true", help="print the end of the server log")
    p.add_argument("--export-to", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export_to:
        export_versions(Path(args.export_to), args.versions + 1)
        return 0
    if not (1 <= args.slow_spread <= 200 and args.seconds <= 3600 and args.versions <= 20):
        raise SystemExit("keep it bounded: --slow-spread 1..200, --seconds <= 3600, --versions <= 20")
    with tempfile.TemporaryDirectory(prefix="soak_serve_") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
