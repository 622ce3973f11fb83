"""Serving against a hostile new user: slow clients, half-copied versions, leaky errors, ids.

One ``jaxreco-serve`` subprocess (JAX blocked) for the module, started on a model directory
that holds only a broken version 1 (every file there, ``saved_model.pb`` corrupt), so the
first test sees the not-ready answers; the ``ready`` fixture then publishes a good version 2
by renaming it into place. Timeouts are short (headers 2 s, body 3 s) so that a slow-client
attack of ~50 connections from loopback addresses (Linux routes all of 127.0.0.0/8 to
``lo``, so ``bind(("127.0.0.2", 0))`` gives a second client address) ends in seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")

from tests import test_export_support as S  # noqa: E402

from jaxreco.serve.guard import ConcurrencyLimitMiddleware  # noqa: E402
from jaxreco.serve.tfenv import quiet_tensorflow  # noqa: E402

HEADER_S, BODY_S, PER_CLIENT, LIMIT = 2.0, 3.0, 8, 20
SLACK_S = 1.5  # timer and scheduling slack on a shared 2-core machine


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    v2, v3 = S.make_mf(seed=0), S.make_mf(seed=1)
    S.export(v2, tmp / "staging", 2)
    S.export(v3, tmp / "staging", 3, model_info={"run_dir": str(tmp / "outputs" / "ml_mf")})
    model_dir = tmp / "models"
    model_dir.mkdir()
    shutil.copytree(tmp / "staging" / "2", tmp / "broken")
    (tmp / "broken" / "saved_model.pb").write_bytes(b"not a SavedModel")
    shutil.move(str(tmp / "broken"), str(model_dir / "1"))
    return tmp, model_dir, v2, v3


@pytest.fixture(scope="module")
def served(models):
    tmp, model_dir, _, _ = models
    server = S.Server(model_dir, tmp / "server.log", "--model-name", "mf", "--poll-interval", "0.2",
                      "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S),
                      "--max-connections-per-client", str(PER_CLIENT),
                      "--limit-concurrency", str(LIMIT))
    try:
        server.wait("/healthz", 200)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ready(served, models):
    tmp, model_dir, v2, _ = models
    if not (model_dir / "2").exists():
        shutil.move(str(tmp / "staging" / "2"), str(model_dir / "2"))
    served.wait("/readyz", 200, timeout=60)
    return served


def _no_paths(text: str, tmp: Path) -> None:
    assert str(tmp) not in text and not re.search(r"""['"\s(]/\w+/""", text), text


def _wait_status(client, version: str, pred, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st, body = client.get("/v1/models/mf")
        if st == 200:
            for s in body["model_version_status"]:
                if s["version"] == version and pred(s):
                    return s
        time.sleep(0.1)
    raise AssertionError(f"version {version} never reached the wanted status: {body}")


# ------------------------------------------------------------------- errors: JSON, no paths
def test_not_ready_answers_say_why_in_json_without_server_paths(served, models):
    tmp = models[0]
    c = served.client
    top = _wait_status(c, "1", lambda s: s["state"] == "END")
    assert top["status"]["error_code"] == "UNKNOWN"
    msg = top["status"]["error_message"]
    assert "load failed" in msg and "1/saved_model.pb" in msg and "retrying in" in msg, msg
    answers = [c.get("/readyz"), c.post("/recommend", {"user": "u3"}),
               c.get("/v1/models/mf/metadata"), c.get("/v1/models/mf")]
    assert [st for st, _ in answers] == [503, 503, 503, 200]
    for st, body in answers[:3]:
        assert set(body) == {"error"}, body
    assert "not ready: no model version loaded yet; version 1: load failed" in answers[0][1]["error"]
    assert answers[1][1]["error"].startswith("no model loaded yet: version 1: load failed")
    for _, body in answers:
        _no_paths(json.dumps(body), tmp)
    # a request httptools cannot parse: JSON 400, not uvicorn's plain text
    reply = _raw(served.port, [b"GARBAGE / NOT-HTTP\r\n\r\n"])
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert json.loads(body) == {"error": "malformed HTTP request: the request line or a header "
                                         "could not be parsed as HTTP/1.1"}


def test_tensorflow_start_up_log_is_quiet_unless_the_user_set_it(served):
    log = served.log()
    assert "oneDNN custom operations" not in log and "absl::InitializeLog" not in log, log[:2000]
    env = {"TF_ENABLE_ONEDNN_OPTS": "1"}
    quiet_tensorflow(env)
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


# ------------------------------------------------------------------- slow clients
def _connect(src: str, port: int, timeout: float) -> socket.socket:
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def _raw(port: int, parts: list[bytes], src: str = "127.0.0.1", timeout: float = 10) -> bytes:
    with _connect(src, port, timeout) as s:
        for p in parts:
            s.sendall(p)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _hold(sock: socket.socket, trickle: bytes, gap: float, until: float) -> tuple[bytes, float | None]:
    """Sends ``trickle`` one byte every ``gap`` s until the server answers or closes (its
    reply and the time it closed) or ``until`` passes (reply, None)."""
    sock.settimeout(gap)
    reply, i = b"", 0
    while time.monotonic() < until:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return reply, time.monotonic()
            reply += chunk
            continue
        except socket.timeout:
            pass
        except OSError:
            return reply, time.monotonic()
        try:
            sock.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
            i += 1
        except OSError:  # closed by the server: collect what it said
            sock.settimeout(1.0)
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except OSError:
                pass
            return reply, time.monotonic()
    return reply, None


def _attacker(src: str, port: int, head: bytes, trickle: bytes, until: float,
              first: socket.socket | None = None) -> list[dict]:
    """One slow client that reconnects whenever the server closes it, until ``until``."""
    conns = []
    while time.monotonic() < until - 0.5 and len(conns) < 20:
        opened = time.monotonic()
        sock = first or _connect(src, port, 5)
        if first is None:
            sock.sendall(head)
        first = None
        with sock:
            reply, closed = _hold(sock, trickle, 0.5, until)
        conns.append({"src": src, "opened": opened, "closed": closed, "reply": reply})
    return conns


def _status_and_json(reply: bytes) -> tuple[int, dict | None]:
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, None
    return int(head[9:12]), json.loads(body) if body else None


def test_slow_clients_are_cut_off_while_valid_requests_all_succeed(ready):
    """~54 slow connections (24 from one address, 24 from 24 addresses trickling headers, 6
    trickling a body) against --limit-concurrency 20: every valid request still answers 200;
    the slow ones are closed by the timeouts with JSON 408s, and one address holds at most
    --max-connections-per-client of them (the rest: JSON 503)."""
    port = ready.port
    head = b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    hdr_trickle = b"X-Slow: " + b"a" * 64
    t0 = time.monotonic()
    until = t0 + 8.0
    # first wave from one address, all open at once: PER_CLIENT admitted, the rest refused
    wave = [_connect("127.0.0.2", port, 5) for _ in range(24)]
    for s in wave:
        s.sendall(head)
    same_address = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                              source_address=("127.0.0.2", 0))
    same_address.request("POST", "/recommend", body=json.dumps({"user": "u3"}))
    r = same_address.getresponse()
    refused_valid = (r.status, json.loads(r.read()))
    same_address.close()

    body = json.dumps({"user": "u3", "k": 5}).encode()
    slow_body_head = (b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                      % len(body))
    with concurrent.futures.ThreadPoolExecutor(max_workers=60) as pool:
        jobs = [pool.submit(_attacker, "127.0.0.2", port, head, hdr_trickle, until, first=s)
                for s in wave]
        jobs += [pool.submit(_attacker, f"127.0.0.{10 + i}", port, head, hdr_trickle, until)
                 for i in range(24)]
        jobs += [pool.submit(_attacker, "127.0.0.3", port, slow_body_head, body, until)
                 for _ in range(6)]
        # valid traffic from 127.0.0.1 meanwhile: fresh connections and one kept alive
        valid, keep = [], S.Client(port, timeout=10)
        time.sleep(0.5)
        for n in range(40):
            client = keep if n % 2 else S.Client(port, timeout=10)
            try:
                valid.append(client.post("/recommend", {"user": "u3", "k": 5}))
            except OSError as e:
                valid.append((0, repr(e)))
            if client is not keep:
                client.close()
            time.sleep(0.15)
        keep.close()
        conns = [c for j in jobs for c in j.result(timeout=30)]

    # valid requests: all answered, none refused
    ok = [st == 200 and len(b["results"][0]["items"]) == 5 for st, b in valid]
    assert sum(ok) / len(ok) == 1.0, [v for v, good in zip(valid, ok) if not good][:3]
    assert refused_valid[0] == 503 and "too many connections from 127.0.0.2" in \
        refused_valid[1]["error"] and "--max-connections-per-client" in refused_valid[1]["error"]

    first = [_status_and_json(jobs[i].result()[0]["reply"]) for i in range(24)]
    assert sorted(st for st, _ in first) == [408] * PER_CLIENT + [503] * (24 - PER_CLIENT), first
    for st, err in first:
        want = "--header-timeout" if st == 408 else f"at most {PER_CLIENT} at once"
        assert want in err["error"], err

    # every slow connection was closed in time, with a JSON answer saying why
    for c in conns:
        st, err = _status_and_json(c["reply"])
        if c["opened"] > until - (BODY_S + SLACK_S + 0.5):
            continue  # opened too late to see its end before the attack stopped
        assert c["closed"] is not None, f"{c['src']}: still open after {until - c['opened']:.1f} s"
        life = c["closed"] - c["opened"]
        if st == 503:
            assert life <= 1.0 + SLACK_S, (c["src"], life)
        elif c["src"] == "127.0.0.3":
            assert st == 408 and "--body-timeout" in err["error"], (st, err)
            assert life <= BODY_S + SLACK_S, life
        else:
            assert st == 408 and "--header-timeout" in err["error"], (st, err)
            assert life <= HEADER_S + SLACK_S, (c["src"], life)
    st, text = ready.client.request("GET", "/metrics")
    counts = dict(re.findall(r'jaxreco_http_guard_total\{reason="(\w+)"\} ([0-9.]+)', text.decode()))
    assert float(counts["header_timeout"]) >= PER_CLIENT + 24
    assert float(counts["body_timeout"]) >= 6
    assert float(counts["client_connections"]) >= 24 - PER_CLIENT


def test_concurrency_limit_refuses_with_json_503_but_never_the_probes():
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call(app, path):
        sent = []

        async def send(m):
            sent.append(m)

        await app({"type": "http", "path": path, "method": "GET"}, None, send)
        return sent

    async def main():
        app = ConcurrencyLimitMiddleware(slow_app, limit=2)
        running = [asyncio.ensure_future(call(app, "/recommend")) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await call(app, "/similar")
        probe = asyncio.ensure_future(call(app, "/readyz"))
        await asyncio.sleep(0.01)
        assert app.active == 2 and not probe.done()  # waiting with the others, not refused
        release.set()
        done = [await t for t in running] + [await probe]
        return refused, done, app.active

    refused, done, active = asyncio.run(main())
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert json.loads(refused[1]["body"]) == {
        "error": "server busy: 2 requests in flight (--limit-concurrency); retry shortly"}
    assert [d[0]["status"] for d in done] == [200, 200, 200] and active == 0


# ------------------------------------------------------------------- versions copied slowly
def _copy_slowly(src: Path, dst: Path, gap: float, half_pause: float) -> None:
    """``cp -r`` as it looks from outside: top-level files, then assets, then an empty
    ``variables/`` whose files arrive last, the data file first cut in half."""
    dst.mkdir()
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        shutil.copy(f, dst / f.name)
        time.sleep(gap)
    for d in ("assets", "assets.extra"):
        shutil.copytree(src / d, dst / d)
        time.sleep(gap)
    (dst / "variables").mkdir()
    time.sleep(gap)
    shutil.copy(src / "variables" / "variables.index", dst / "variables")
    time.sleep(gap)
    data = next((src / "variables").glob("variables.data-*"))
    blob = data.read_bytes()
    with open(dst / "variables" / data.name, "wb") as f:
        f.write(blob[: len(blob) // 2])
    time.sleep(half_pause)
    with open(dst / "variables" / data.name, "ab") as f:
        f.write(blob[len(blob) // 2:])


def test_a_version_copied_file_by_file_is_retried_until_it_serves(ready, models):
    tmp, model_dir, _, v3 = models
    c = S.Client(ready.port)
    copier = threading.Thread(target=_copy_slowly,
                              args=(tmp / "staging" / "3", model_dir / "3", 0.3, 2.5))
    copier.start()
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st, body = c.get("/v1/models/mf")
        s = next((s for s in body["model_version_status"] if s["version"] == "3"), None)
        if s is not None:
            seen.append((s["state"], s["status"]["error_code"], s["status"]["error_message"]))
            if s["state"] == "AVAILABLE":
                break
        time.sleep(0.1)
    copier.join(30)
    assert seen and seen[-1][0] == "AVAILABLE", seen[-5:]
    waiting = [m for st, code, m in seen if (st, code) == ("LOADING", "UNAVAILABLE")]
    assert any(m.startswith("waiting for files: ") and "variables/variables.index" in m
               for m in waiting), seen[:5]
    failed = [m for st, code, m in seen if (st, code) == ("END", "UNKNOWN")]
    assert failed and all("load failed" in m and "retrying in" in m for m in failed), seen
    for m in {m for _, _, m in seen}:
        _no_paths(m, tmp)
    st, body = c.get("/readyz")
    assert (st, body["model_version"]) == (200, 3)
    st, body = c.post("/recommend", {"user": "u3", "k": 5})
    want = [v3.item_id(i) for i in S.ref_recommend(v3, v3.all_scores()[3], 3, 5)]
    assert body["model_version"] == 3 and [x["item"] for x in body["results"][0]["items"]] == want
    st, body = c.get("/v1/models/mf/metadata")  # the run directory, without its path
    assert st == 200 and body["metadata"]["jaxreco"]["model_info"]["run_dir"] == "ml_mf"
    c.close()


def test_an_empty_next_version_folder_is_reported_and_warned_about_once(ready, models):
    tmp, model_dir, _, _ = models
    c = S.Client(ready.port)
    version = c.get("/readyz")[1]["model_version"]
    empty = model_dir / "90"
    empty.mkdir()
    s = _wait_status(c, "90", lambda s: s["state"] == "LOADING")
    assert s["status"]["error_code"] == "UNAVAILABLE"
    assert s["status"]["error_message"].startswith("waiting for files: saved_model.pb, ")
    _no_paths(s["status"]["error_message"], tmp)
    time.sleep(1.0)  # five more polls
    assert ready.log().count("model version 90 at ") == 1
    assert c.get("/readyz") == (200, {"status": "ready", "model_version": version})
    empty.rmdir()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "90" in {
            s["version"] for s in c.get("/v1/models/mf")[1]["model_version_status"]}:
        time.sleep(0.1)
    assert "90" not in {s["version"] for s in c.get("/v1/models/mf")[1]["model_version_status"]}
    c.close()


# ------------------------------------------------------------------- ids the model lacks
def test_answers_name_the_ids_the_model_does_not_know(ready):
    c = S.Client(ready.port)
    st, body = c.post("/recommend", {"users": ["u3", "260", "1m_1", "260"], "k": 3,
                                     "exclude_items": ["1001", "Star Wars (1977)"]})
    assert st == 200
    assert body["unknown_users"] == ["260", "1m_1"]
    assert body["unknown_exclude_items"] == ["Star Wars (1977)"]
    assert [r["cold_start"] for r in body["results"]] == [False, True, True, True]
    st, body = c.post("/recommend", {"session": "s-1", "k": 3})  # anonymous: not "unknown"
    assert (st, body["unknown_users"], body["unknown_exclude_items"]) == (200, [], [])
    st, body = c.post("/similar", {"items": ["1001", "260"], "k": 3})
    assert st == 200 and body["unknown_items"] == ["260"]
    c.close()
