"""Every experiment in conf/experiment/ trains on smoke-sized data, exports through the one
path (``jaxreco.export.export_run``) and is served: the server's own ``/recommend`` code
answers from the SavedModel with the run's scores, and CTR models answer ``predict_ctr``."""

from __future__ import annotations

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="export tests need the [export] extra (tensorflow-cpu)")

from jaxreco import export as export_lib  # noqa: E402
from jaxreco.run import restore_run  # noqa: E402
from jaxreco.serve.app import _recommend_batch  # noqa: E402
from jaxreco.serve.model import ServedModel  # noqa: E402
from tests.conftest import write_ratings_dat, write_u_data  # noqa: E402
from tests.support import ROOT, train  # noqa: E402
from tests.test_export_run import _obd_wheel  # noqa: E402

# Experiments whose export path another default-run test already takes run in the slow job
# (`pytest -m slow`), keeping the default run within its time budget: rating MF
# (ml100k_mf here), NeuMF (ml1m_ncf_neumf here; its GMF and MLP halves and every combiner in
# tests/test_export_models.py), iALS/dot fold-in and CTR (tests/test_export_run.py),
# sequential (tests/test_export_sequential.py, tests/test_explain_sequential.py).
SLOW = {"synthetic_session_sasrec", "instacart_sasrec", "ask_instacart", "dp_ials",
        "federated_ials", "ask_ml1m",
        "instacart_complement", "ml1m_ncf_neumf_pretrained", "ml1m_ncf_mf_rendle",
        "ml1m_ncf_mf_lazy_adam", "zozotown_ope", "synthetic_ctr", "ab_simulated", "ml1m_mf_dp",
        "synthetic_coupons", "zozotown_ctr", "ml1m_ncf_mlp", "ml1m_ncf_gmf", "ml1m_ncf_mf",
        "ml1m_ncf_mf_uniform", "ml1m_mf", "ml1m_sasrec", "ml1m_sasrec_dp"}
EXPERIMENTS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
               for n in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))]
SMALL = ["trainer.epochs=1", "trainer.batch_size=64", "trainer.progress_bar=false",
         "trainer.async_checkpoint=false", "logger.tensorboard=false", "mesh.axes.data=1",
         "mesh.axes.model=1"]
EMBED = ["model.dim=4", "model.mf_dim=4", "model.mlp_dims=[8,4]"]


def _overrides(name: str, tmp_path) -> list[str]:
    if name in ("ml100k_mf", "ml1m_mf", "ml1m_mf_dp", "ml1m_mf_bpmf"):
        write = write_u_data if name == "ml100k_mf" else write_ratings_dat
        return [f"dataset.path={write(tmp_path / 'ml', num_users=40, num_items=30, n=900)}",
                "model.dim=4"]
    if name.startswith("ml1m_sasrec"):
        d = write_ratings_dat(tmp_path / "ml", num_users=70, num_items=120, n=1400)
        return [f"dataset.path={d}", "task.prepare.negatives.num=9", "model.dim=8",
                "model.max_len=6", "model.num_blocks=1"]
    if name == "synthetic_session_sasrec":
        return ["dataset.num_interactions=12000", "dataset.num_users=200",
                "dataset.num_items=60", "task.prepare.negatives.num=9", "model.dim=8",
                "model.max_len=6", "model.num_blocks=1"]
    if name == "instacart_complement":
        return [f"dataset.path={_instacart_csv(tmp_path / 'instacart.csv')}",
                "task.prepare.negatives.num=9", *EMBED]
    if name in ("instacart_sasrec", "ask_instacart"):
        return [f"dataset.path={_instacart_csv(tmp_path / 'instacart.csv')}",
                "task.prepare.negatives.num=9", "task.next_item.num_sampled=16",
                "model.dim=8", "model.max_len=6", "model.num_blocks=1"]
    if name.startswith("ml1m_ncf") or name in ("dp_ials", "federated_ials", "ask_ml1m"):
        d = write_ratings_dat(tmp_path / "ml", num_users=40, num_items=120, n=1200)
        return [f"dataset.path={d}", "task.prepare.negatives.num=9", *EMBED]
    if name in ("synthetic_ctr", "ab_simulated"):
        return ["dataset.num_interactions=8000", "dataset.num_users=100",
                "dataset.num_items=60", *EMBED]
    if name == "synthetic_coupons":
        return ["dataset.num_users=100", "dataset.exposures_per_user=30", *EMBED]
    if name in ("zozotown_ctr", "zozotown_ope"):
        _obd_wheel(tmp_path / "wheels", n=2000)
        return [f"dataset.cache_dir={tmp_path / 'wheels'}", "dataset.policies=[random]", *EMBED]
    raise AssertionError(f"no smoke-sized data for experiment {name}: add it here")


def _instacart_csv(path, users=70, products=60, orders=3, per_order=4, seed=0):
    """A tiny file in instacart-sample's format (``jaxreco.data.instacart``)."""
    rng = np.random.default_rng(seed)
    rows, oid = [], 0
    for u in range(users):
        for n in range(1, orders + 1):
            oid += 1
            prior = "" if n == 1 else str(int(rng.integers(1, 30)))
            for a, prod in enumerate(rng.choice(products, per_order, replace=False), 1):
                rows.append(f"{oid},{u + 1},{n},{rng.integers(7)},{rng.integers(24)},{prior},"
                            f"{prod + 1},{a},{int(n > 1)}")
    path.write_text("order_id,user_id,order_number,order_dow,order_hour_of_day,"
                    "days_since_prior_order,product_id,add_to_cart_order,reordered\n"
                    + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_exports_and_serves(name, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXRECO_CACHE", str(tmp_path / "cache"))
    over = [f"experiment={name}", *_overrides(name, tmp_path), *SMALL]
    if name == "ml1m_ncf_neumf_pretrained":        # pre-trained from a GMF and an MLP run
        for part in ("gmf", "mlp"):
            train(tmp_path / part, [f"experiment=ml1m_ncf_{part}", *over[1:]])
        over += [f"model.pretrained_gmf={tmp_path / 'gmf'}",
                 f"model.pretrained_mlp={tmp_path / 'mlp'}"]
    metrics = train(tmp_path / "run", over)
    path = export_lib.export_run(tmp_path / "run", tmp_path / "models", 1)
    served = ServedModel(path)

    r = restore_run(tmp_path / "run", full=False)
    uv = r.task.data.table("user_vocab")["raw_id"].astype(str)
    users = [str(u) for u in uv[:3]]
    out = _recommend_batch(served, [{"users": users, "k": 5, "exclude_items": []}])[0]
    assert [x["user"] for x in out["results"]] == users
    seen = r.task.positives("train")
    iv = r.task.data.table("item_vocab")["raw_id"].astype(str)
    scores, known = served.user_scores(users)
    assert known.all()
    for row, res in enumerate(out["results"]):
        assert not res["cold_start"] and len(res["items"]) == 5
        mine = set(iv[seen[1][seen[0] == row]])
        assert not mine & {x["item"] for x in res["items"]}          # training items excluded
        got = [x["score"] for x in res["items"]]
        assert got == sorted(got, reverse=True)
    meta = json.loads((path / "assets.extra" / "jaxreco.json").read_text())
    assert meta["model_info"]["checkpoint_step"] == metrics["train/best_step"]
    # a session of events: the known items drive the answer and are not recommended
    sess = [(str(x), "click", 0.0) for x in iv[:3]] + [("no-such-item", "", 0.0)]
    got = _recommend_batch(served, [{"users": [None, users[0]], "k": 5, "exclude_items": [],
                                     "session": sess}])[0]
    mode = {"sequential": "sequential"}.get(r.cfg.model.name, (
        "foldin" if r.cfg.model.name == "embed_mlp" and r.cfg.model.combiner == "dot"
        and not r.cfg.task.side_features and not r.cfg.task.context_features else "exclude"))
    assert meta["session"]["mode"] == mode
    assert got["unknown_session_items"] == ["no-such-item"]
    for res in got["results"]:
        assert res["session"]["mode"] == mode and res["session"]["used"] == 3
        assert len(res["items"]) == 5 and not {x["item"] for x in res["items"]} & set(iv[:3])
    if r.task.kind == "ctr":
        ctx = {f: [0, 0, 0] for f in r.cfg.task.context_features}
        p = served.predict_ctr(users, [str(i) for i in iv[:3]], ctx)
        probs = np.asarray(p["click"] if "click" in p else next(iter(p.values())))
        assert probs.shape == (3,) and ((probs > 0) & (probs < 1)).all()
