"""The online A/B loop on simulated shoppers (experiments/ab_simulated/README.md): train,
export the model (version 2) and the popularity baseline (version 1), serve both as arms,
let the synthetic generator's users shop (scripts/simulate_shoppers.py), report, retrain on
the collected events and export that (version 3)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="export and serving need tensorflow-cpu")

from jaxreco import export as export_lib  # noqa: E402
from jaxreco import report as report_lib  # noqa: E402
from jaxreco.baselines import export_popularity, popularity  # noqa: E402
from jaxreco.data import synthetic  # noqa: E402
from jaxreco.data.prepare import load_table, prepare  # noqa: E402
from tests.support import ROOT, train  # noqa: E402


def _load(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


SIM = _load("simulate_shoppers", ROOT / "scripts" / "simulate_shoppers.py")
S = _load("jaxreco_test_export_support", ROOT / "tests" / "test_export_support.py")
RUN = ["trainer.progress_bar=false", "trainer.async_checkpoint=false", "logger.tensorboard=false"]


def _server_has_arms() -> bool:
    from jaxreco.serve.cli import build_parser

    return any("--arm" in a.option_strings for a in build_parser()._actions)


def test_popularity_baseline_recommends_the_most_popular_unseen_items(tmp_path):
    from jaxreco.serve.model import ServedModel
    from jaxreco.serve.rules import top_k

    out = str(tmp_path / "prep")
    prepare({"dataset": {"name": "synthetic-ecommerce", "num_interactions": 6000,
                         "num_users": 60, "num_items": 40, "num_categories": 4, "seed": 1},
             "prepare": {"output_dir": out, "progress": False, "dedup": "aggregate",
                         "negatives": {"num": 0}}})
    path = export_popularity(out, tmp_path / "models", 1)
    m = ServedModel(path)
    pop, u, i = popularity(out)
    assert pop.sum() == len(u) > 0
    uv = load_table(out, "user_vocab")["raw_id"].astype(str)
    iv = load_table(out, "item_vocab")["raw_id"].astype(str)
    scores, known = m.user_scores(list(uv[:5]))
    assert known.all()
    idx, _ = top_k(scores, 5, None)
    for row in range(5):
        seen = set(i[u == row].tolist())
        order = [j for j in np.argsort(-pop, kind="stable") if j not in seen][:5]
        assert list(iv[order]) == [m.item_ids[j] for j in idx[row]]
    cold, k2 = m.user_scores(["not-a-user"])
    assert not k2[0] and np.argmax(cold[0]) == np.argmax(pop)
    meta = json.loads((path / "assets.extra" / "jaxreco.json").read_text())
    assert meta["model_info"]["baseline"] == "popularity"


@pytest.mark.skipif(not _server_has_arms(), reason="waiting for the server side: "
                    "jaxreco-serve has no --arm yet (A/B arms, events endpoint)")
def test_trained_arm_wins_the_simulated_ab_test_and_the_loop_closes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    # 1. the treatment: experiment=ab_simulated; the control: popularity on the same data
    metrics = train(tmp_path / "run", ["experiment=ab_simulated", *RUN])
    assert metrics["test/auc"] > 0.75
    models = tmp_path / "models"
    export_lib.export_run(tmp_path / "run", models, 2)
    prepared = json.loads((tmp_path / "run" / "splits.json").read_text())["prepared"]
    export_popularity(prepared, models, 1)

    # 2. both served as arms; shoppers from the generator's ground truth
    edir = tmp_path / "events"
    server = S.Server(models, tmp_path / "server.log", "--arm", "control=1",
                      "--arm", "treatment=2", "--split", "50,50", "--salt", "ab-test",
                      "--events-dir", str(edir), "--replica-id", "r0")
    try:
        server.wait()
        params = SIM.load_params(str(tmp_path / "run" / "config.yaml"), [])
        sim = SIM.simulate(f"http://127.0.0.1:{server.port}", params, requests=250,
                           seconds=150, seed=0)
    finally:
        server.stop()
    assert sim["requests"] == 250, sim        # not cut short by the time bound

    # 3. the report: the trained arm wins; each arm's interval holds its ground truth
    res = report_lib.report(str(edir), out_dir=str(tmp_path / "report"))["result"]
    assert res["arms"] == ["control", "treatment"] and not res["srm"]["mismatch"]
    assert report_lib.winner(res) == "treatment"
    lift = res["lift"]["treatment"]["ctr"]
    assert lift["lo"] > 0 and lift["p"] < 1e-6, lift
    for arm in res["arms"]:
        got, want = res["per_arm"][arm], sim["arms"][arm]
        assert got["model_versions"] == [{"control": "1", "treatment": "2"}[arm]]
        # every event the simulator sent was acknowledged, written and read back once
        assert got["impressions"] == want["impressions"]
        assert (got["clicks"], got["carts"], got["purchases"]) == (
            want["sent"]["clicks"], want["sent"]["carts"], want["sent"]["purchases"])
        assert got["revenue"] == pytest.approx(want["sent"]["revenue"])
        ctr = got["ctr"]
        assert ctr.lo <= want["truth"]["ctr"] <= ctr.hi, (arm, ctr, want["truth"])

    # 4. the loop closed: retrain on the collected events, export as version 3
    m3 = train(tmp_path / "run_events", ["experiment=ab_simulated", "dataset=events",
                                         f"dataset.path={edir}", *RUN])
    assert m3["test/auc"] > 0.6
    v3 = export_lib.export_run(tmp_path / "run_events", models, 3)
    offline = {v: SIM.model_truth(str(models / str(v)), params) for v in (1, 2, 3)}
    assert offline[3]["ctr"] > offline[1]["ctr"], offline       # learnt from the clicks
    assert abs(offline[2]["ctr"] - sim["arms"]["treatment"]["truth"]["ctr"]) < 0.02
    assert v3.name == "3" and offline[3]["users"] == params.num_users
