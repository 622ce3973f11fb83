"""Readiness before any model, then a new version picked up under load without dropping requests."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")

from tests import test_export_support as S  # noqa: E402


def test_not_ready_until_a_model_then_hot_swap_without_dropping_requests(tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    v1, v2 = S.make_mf(seed=0), S.make_mf(seed=1)  # different parameters, same vocabularies
    S.export(v1, tmp_path / "staging", 1)
    server = S.Server(model_dir, tmp_path / "server.log", "--poll-interval", "0.2")
    try:
        server.wait("/healthz", 200)
        c = server.client
        st, body = c.get("/readyz")
        assert st == 503 and "no model version loaded" in body["error"]
        st, body = c.post("/recommend", {"user": "u3"})
        assert st == 503 and "no model loaded yet" in body["error"]
        assert c.get("/v1/models/jaxreco")[0] == 404

        shutil.move(str(tmp_path / "staging" / "1"), str(model_dir / "1"))
        server.wait("/readyz", 200, timeout=60)
        assert c.get("/readyz")[1]["model_version"] == 1

        # load from two client threads while version 2 is exported into the served directory
        stop = threading.Event()
        results, errors = [], []

        def hammer(user):
            client = S.Client(server.port)
            while not stop.is_set():
                try:
                    results.append((user, *client.post("/recommend", {"user": f"u{user}", "k": 5})))
                except Exception as e:  # noqa: BLE001 - a dropped request is a failure
                    errors.append(repr(e))
            client.close()

        threads = [threading.Thread(target=hammer, args=(u,)) for u in (3, 4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        S.export(v2, model_dir, 2)  # written to a temp dir, renamed into place
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and c.get("/readyz")[1].get("model_version") != 2:
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)

        assert not errors, errors[:3]
        assert results and all(st == 200 for _, st, _ in results), \
            [r for r in results if r[1] != 200][:3]
        versions = [b["model_version"] for _, _, b in results]
        assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
        # answers from each version are that version's model
        scores = {1: v1.all_scores(), 2: v2.all_scores()}
        data = {1: v1, 2: v2}
        for user, _, body in results[:: max(1, len(results) // 50)] + results[-4:]:
            v = body["model_version"]
            want = [data[v].item_id(i) for i in S.ref_recommend(data[v], scores[v][user], user, 5)]
            assert [x["item"] for x in body["results"][0]["items"]] == want
        st, body = c.get("/v1/models/jaxreco")
        assert [(s["version"], s["state"]) for s in body["model_version_status"]] == \
            [("2", "AVAILABLE"), ("1", "END")]

        # a broken newer version (all its files there, saved_model.pb corrupt) is reported,
        # without the server's paths, and the server keeps serving version 2
        shutil.copytree(model_dir / "2", tmp_path / "broken")
        (tmp_path / "broken" / "saved_model.pb").write_bytes(b"not a SavedModel")
        shutil.move(str(tmp_path / "broken"), str(model_dir / "3"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st, body = c.get("/v1/models/jaxreco")
            if body["model_version_status"][0]["state"] == "END":
                break
            time.sleep(0.1)
        top = body["model_version_status"][0]
        assert top["version"] == "3" and top["status"]["error_code"] == "UNKNOWN"
        assert "load failed" in top["status"]["error_message"]
        assert str(tmp_path) not in top["status"]["error_message"]
        st, body = c.post("/recommend", {"user": "u3"})
        assert st == 200 and body["model_version"] == 2
    finally:
        server.stop()
