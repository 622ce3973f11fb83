"""The non-personal popularity ranking on ml1m_sasrec_dp's test protocol: each test item
against its 99 stored negatives, scored by the item's count in the train sequences (ties
count against the test item, as in ``jaxreco.evaluate.RankingEvaluator``).

    JAXRECO_CACHE=... python experiments/ml1m_sasrec_dp/popularity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support import compose_train  # noqa: E402

from jaxreco.train import tasks as tasks_lib  # noqa: E402


def main() -> None:
    cfg = compose_train(["experiment=ml1m_sasrec_dp"])
    task = tasks_lib.build(cfg, tasks_lib.PreparedData.prepare(cfg))
    pop = np.bincount(task.seq.item, minlength=task.num_items).astype(np.float64)
    c = task.candidates["test"]
    pos = pop[np.asarray(c["item"])]
    neg = pop[np.asarray(c["negatives"])]
    rank = (neg >= pos[:, None]).sum(1)
    for k in (10,):
        print(f"popularity_test_hr@{k}: {np.mean(rank < k):.4f}")
        print(f"popularity_test_ndcg@{k}: {np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0)):.4f}")
    print(f"test_rows: {len(rank)}")


if __name__ == "__main__":
    main()
