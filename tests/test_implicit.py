"""Implicit-feedback training end to end on a tiny MovieLens-format set: the fixed
evaluation negatives are identical across runs, the metrics beat chance, and an
interrupted run resumes to exactly the figures of an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
from omegaconf import OmegaConf

from jaxreco.data.prepare import load_split, prepare
import pytest

from tests.conftest import run_cli


@pytest.fixture
def ml_dir(tmp_path):
    """60 users in 4 taste groups, each rating 30 of its group's 50 items (200 items)."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(60):
        g = u % 4
        for i in rng.choice(50, 30, replace=False):
            lines.append(f"{u + 1}\t{g * 50 + i + 1}\t{rng.integers(1, 6)}\t"
                         f"{880000000 + rng.integers(0, 10**7)}\n")
    d = tmp_path / "ml-groups"
    d.mkdir()
    (d / "u.data").write_text("".join(lines))
    return d

COMMON = ["model=embed_mlp", "model.combiner=dot", "model.mf_dim=8", "model.bias=true",
          "task.kind=implicit", "task.num_negatives=4",
          "+task.prepare.split={kind: leave_last_out, num_val: 0, num_test: 1}",
          "+task.prepare.negatives={num: 20, sampler: uniform, seed: 0}",
          "task.ks=[5,10]", "trainer.batch_size=128", "trainer.epochs=4",
          "trainer.progress_bar=false", "trainer.async_checkpoint=false",
          "optimizer.lr=0.02", "logger.tensorboard=false"]


def _train(tmp_path, ml_dir, *extra, run="run"):
    out = tmp_path / run
    p = run_cli(["jaxreco.cli.train", f"dataset.path={ml_dir}", f"hydra.run.dir={out}",
                 *COMMON, *extra], cwd=tmp_path,
                env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_fixed_negatives_identical_across_runs_and_never_positive(tmp_path, ml_dir):
    cfg = {"dataset": {"name": "movielens-100k", "path": str(ml_dir)},
           "prepare": {"split": {"kind": "leave_last_out", "num_val": 1, "num_test": 1},
                       "negatives": {"num": 20, "sampler": "uniform", "seed": 0},
                       "progress": False}}
    a, b = (OmegaConf.create(cfg) for _ in range(2))
    a.prepare.output_dir, b.prepare.output_dir = str(tmp_path / "a"), str(tmp_path / "b")
    prepare(a), prepare(b)
    ca, cb = (load_split(str(tmp_path / d), "test_candidates") for d in "ab")
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k])
    pos = set()
    for s in ("train", "val", "test"):
        d = load_split(str(tmp_path / "a"), s, ["user", "item"])
        pos |= set(zip(d["user"].tolist(), d["item"].tolist()))
    assert not any((u, n) in pos for u, row in zip(ca["user"], ca["negatives"]) for n in row)
    assert ca["negatives"].shape[1] == 20


def test_implicit_training_beats_chance_is_deterministic_and_resumes(tmp_path, ml_dir):
    a = _train(tmp_path, ml_dir, run="a")
    det = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731
    # 1 held-out item + 20 negatives: chance HR@5 = 5/21 = 0.24
    assert a["test/hr@5"] > 0.4, a
    assert {"test/hr@10", "test/ndcg@10", "test/full/hr@10", "test/full/ndcg@10",
            "test/mrr", "test/full/coverage@10", "test/recall@5"} <= set(a)
    assert a["test/hr@10"] >= a["test/hr@5"] and a["test/full/hr@10"] <= a["test/hr@10"]
    # interrupted after 2 of 4 epochs, rerun in the same directory: the same figures as the
    # uninterrupted run (so the step-seeded negatives and the iterator resume exactly)
    _train(tmp_path, ml_dir, "trainer.max_steps=" + str(a["train/steps"] // 2), run="c")
    c = _train(tmp_path, ml_dir, run="c")
    assert det(c) == det(a)
    # jaxreco-eval on the run directory reproduces the trainer's test figures
    from jaxreco.cli.eval import main as eval_main
    assert eval_main([str(tmp_path / "a")]) == 0
    e = json.loads((tmp_path / "a" / "eval.json").read_text())
    for k in ("test/hr@10", "test/ndcg@10", "test/full/hr@10", "test/full/mrr"):
        assert e[k] == pytest.approx(a[k], abs=1e-9), k


def test_pair_regularisation_counts_user_rows_once_per_scored_pair():
    import jax.numpy as jnp

    from jaxreco.train.tasks import row_norms as _row_norms

    k = 3
    rows = {"user_mf": {"user": jnp.full((2, 4), 1.0)},
            "item_mf": {"item": jnp.full((2, 4), 2.0), "neg_item": jnp.full((2 * k, 4), 0.5)}}
    per_positive = _row_norms(rows, ("user_mf", "item_mf"), k)
    per_pair = _row_norms(rows, ("user_mf", "item_mf"), k, item_side={"item"},
                          user_weight=1 + k)
    # ‖p_u‖² = 4, ‖q_i‖² = 16, each negative 1: 4 + 16 + 3 = 23; per pair 4·(1+k) + 16 + 3
    np.testing.assert_allclose(per_positive, [23.0, 23.0])
    np.testing.assert_allclose(per_pair, [35.0, 35.0])


def _scores(run_dir, users, items):
    from flax import nnx

    from jaxreco.run import restore_run
    from jaxreco.models.layers import gather_rows

    r = restore_run(str(run_dir), full=False)
    model = nnx.merge(r.graphdef, r.state.tables, r.state.dense)
    batch = {"user": users, "item": items}
    feats = {t: tuple(f for f in fs if f in batch) for t, fs in model.table_features.items()}
    return np.asarray(model.score(gather_rows(r.state.table_values(), batch, feats), batch))


@pytest.mark.slow  # ~22 s: three trainings
def test_neumf_pretrained_from_gmf_and_mlp_runs_scores_their_mixture(tmp_path, ml_dir):
    mlp = ["model.combiner=mlp", "model.dim=8", "model.mlp_dims=[16,8]", "model.bias=false"]
    _train(tmp_path, ml_dir, "model.combiner=gmf", "model.bias=false", "trainer.epochs=2",
           run="gmf")
    _train(tmp_path, ml_dir, *mlp, "trainer.epochs=2", run="mlp")
    # learning rates 0: the NeuMF run keeps its initial (pre-trained) parameters
    _train(tmp_path, ml_dir, "model.combiner=both", "model.dim=8", "model.mlp_dims=[16,8]",
           "model.bias=false", "trainer.epochs=1", "optimizer.lr=0", "optimizer.dense_lr=0",
           f"model.pretrained_gmf={tmp_path / 'gmf'}", f"model.pretrained_mlp={tmp_path / 'mlp'}",
           "model.pretrained_alpha=0.3",
           run="neumf")
    import jax.numpy as jnp
    users, items = jnp.arange(40, dtype=jnp.int32), jnp.arange(40, dtype=jnp.int32) * 5
    want = 0.3 * _scores(tmp_path / "gmf", users, items) + 0.7 * _scores(tmp_path / "mlp",
                                                                         users, items)
    np.testing.assert_allclose(_scores(tmp_path / "neumf", users, items), want, rtol=1e-5,
                               atol=1e-5)
    # a run of another combiner is refused with the field and the run named
    out = tmp_path / "bad"
    p = run_cli(["jaxreco.cli.train", f"dataset.path={ml_dir}", f"hydra.run.dir={out}", *COMMON,
                 "model.combiner=both", "model.dim=8", "model.mlp_dims=[16,8]",
                 f"model.pretrained_gmf={tmp_path / 'mlp'}", f"model.pretrained_mlp={tmp_path / 'mlp'}"],
                cwd=tmp_path, env_extra={"JAXRECO_CACHE": str(tmp_path / "cache")})
    assert p.returncode != 0 and "model.pretrained_gmf=" in p.stderr
    assert "combiner='mlp'" in p.stderr
