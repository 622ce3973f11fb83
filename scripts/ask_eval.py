"""Evaluates ``/ask`` on queries built from held-out items (experiments/ask_ml1m/README.md,
experiments/ask_instacart/README.md).

For each user of a prepared leave-last-out split, a query built from the user's held-out
item's tags (MovieLens: its genres; Instacart: its department's name); success = the held-out
item in the
top ``--k`` answers (HR@k), with NDCG@k and MRR. Systems, same queries, same candidates
(BM25 matches, the user's training items excluded in every system, as the served model
excludes them):

The query: one genre of the held-out item (``--query genre``, e.g. ``comedy``) or all its
genres (``--query genres``, e.g. ``action crime thriller``: the BM25 score then varies).

* ``text``: BM25 alone (:mod:`jaxreco.ask`), ties by item index;
* ``text+pop``: BM25 mixed with item popularity (training counts), the same z-mix, its
  weight chosen on validation: a re-rank that is not personal;
* ``personal``: BM25 mixed with the served model's scores for the user (``user_scores`` of
  the exported SavedModel), the weight chosen on validation.

The weights are chosen on the ``val`` split's queries (the second-to-last item; the model
was trained without it) and reported on ``test`` (the last item). Prints ``name: value``.

    python scripts/ask_eval.py --run-dir RUN --model-dir EXPORTED/1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxreco import ask
from jaxreco.data.prepare import load_split, load_table

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def queries(cat: ask.Catalogue, users: np.ndarray, items: np.ndarray, seed: int,
            kind: str = "genre"):
    """Per held-out item: one of its genres (``genre``, drawn with ``seed``) or all of them
    (``genres``, e.g. ``action crime thriller``), lower case."""
    rng = np.random.default_rng(seed)
    out = []
    for u, i in zip(users.tolist(), items.tolist()):
        g = cat.text.tags[i].split()
        if not g:              # an item without tags (an Instacart product of no known
            continue           # department) makes no query: counted, not scored
        q = str(g[rng.integers(len(g))]) if kind == "genre" else " ".join(g)
        out.append((u, i, q.lower()))
    return out


def evaluate(cat, qs, personal_of, seen_of, weights, k):
    """``{weight: (hr, ndcg, mrr)}``: each query's held-out item ranked among the BM25
    candidates ordered by :func:`jaxreco.ask.mix_order` (``personal_of(u)`` None: text)."""
    hits = {w: [] for w in weights}
    ndcg = {w: [] for w in weights}
    rr = {w: [] for w in weights}
    cache = {}
    for u, target, word in qs:
        if word not in cache:
            cache[word] = cat.candidates(ask.parse_query(word))
        cand, s = cache[word]
        cand = cand[~np.isin(cand, seen_of(u))]
        p = personal_of(u)
        for w in weights:
            order = ask.mix_order(cand, s, p, w)
            pos = np.flatnonzero(order == target)
            r = int(pos[0]) + 1 if pos.size else 10 ** 9
            hits[w].append(r <= k)
            ndcg[w].append(1 / np.log2(r + 1) if r <= k else 0.0)
            rr[w].append(1 / r)
    return {w: (float(np.mean(hits[w])), float(np.mean(ndcg[w])), float(np.mean(rr[w])))
            for w in weights}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="the jaxreco-train run (its splits.json)")
    ap.add_argument("--model-dir", required=True, help="its export: a version directory")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-users", type=int, default=0, help="0 = every user")
    ap.add_argument("--query", choices=("genre", "genres"), default="genre",
                    help="one genre of the held-out item, or all its genres")
    args = ap.parse_args(argv)
    t0 = time.time()
    from jaxreco.serve.model import ServedModel

    prepared = json.loads((Path(args.run_dir) / "splits.json").read_text())["prepared"]
    model = ServedModel(args.model_dir)
    text = ask.ItemText.load(Path(args.model_dir) / "assets.extra" / ask.ITEM_TEXT_FILE)
    cat = ask.Catalogue(text)
    uv = load_table(prepared, "user_vocab")["raw_id"].astype(str)
    iv = load_table(prepared, "item_vocab")["raw_id"].astype(str)
    if [str(x) for x in model.item_ids] != iv.tolist():
        sys.exit(f"{args.model_dir}: its items are not the prepared data's items")
    train = load_split(prepared, "train", ["user", "item"])
    tu, ti = np.asarray(train["user"]), np.asarray(train["item"])
    order = np.argsort(tu, kind="stable")
    starts = np.searchsorted(tu[order], np.arange(len(uv) + 1))
    seen_items = ti[order]

    def seen_of(u):
        return seen_items[starts[u]:starts[u + 1]]

    pop = np.bincount(ti, minlength=len(iv)).astype(np.float64)
    scores: dict[int, np.ndarray] = {}

    def personal_of(u):
        return scores[u]

    results = {}
    for split in ("val", "test"):
        d = load_split(prepared, split, ["user", "item"])
        users, items = np.asarray(d["user"]), np.asarray(d["item"])
        if args.max_users:
            users, items = users[:args.max_users], items[:args.max_users]
        need = [u for u in np.unique(users).tolist() if u not in scores]
        for j in range(0, len(need), 256):
            b = need[j:j + 256]
            s, known = model.user_scores([uv[u] for u in b])
            for u, row, kn in zip(b, s, known):
                if not kn:
                    sys.exit(f"user {uv[u]} unknown to the model")
                scores[u] = np.asarray(row, np.float64)
        qs = queries(cat, users, items, args.seed + (0 if split == "val" else 1), args.query)
        results[split] = {
            "text": evaluate(cat, qs, lambda u: None, seen_of, (0.0,), args.k),
            "text+pop": evaluate(cat, qs, lambda u: pop, seen_of, WEIGHTS, args.k),
            "personal": evaluate(cat, qs, personal_of, seen_of, WEIGHTS, args.k)}
        results[split]["n"] = len(qs)
        results[split]["skipped"] = len(users) - len(qs)
    k = args.k
    print(f"query: {args.query}")
    print(f"queries_val: {results['val']['n']}")
    print(f"queries_test: {results['test']['n']}")
    for split in ("val", "test"):
        print(f"queries_{split}_skipped_no_text: {results[split]['skipped']}")
    for name in ("text+pop", "personal"):
        for w, (hr, nd, mrr) in results["val"][name].items():
            print(f"val/{name}/w={w}/hr@{k}: {hr:.4f}  ndcg@{k}: {nd:.4f}  mrr: {mrr:.4f}")
    best = {name: max(results["val"][name], key=lambda w: results["val"][name][w][1])
            for name in ("text+pop", "personal")}
    best["text"] = 0.0
    for name in ("text", "text+pop", "personal"):
        w = best[name]
        for split in ("val", "test"):
            hr, nd, mrr = results[split][name][w]
            print(f"{split}/{name}/hr@{k}: {hr:.4f}")
            print(f"{split}/{name}/ndcg@{k}: {nd:.4f}")
            print(f"{split}/{name}/mrr: {mrr:.4f}")
        if name != "text":
            print(f"{name}/weight_chosen_on_val: {w}")
    w = ask.PERSONAL_WEIGHT             # what /ask serves (chosen on both query kinds' val)
    if w in results["val"]["personal"]:
        for split in ("val", "test"):
            hr, nd, mrr = results[split]["personal"][w]
            print(f"{split}/personal_served_w={w}/hr@{k}: {hr:.4f}")
            print(f"{split}/personal_served_w={w}/ndcg@{k}: {nd:.4f}")
            print(f"{split}/personal_served_w={w}/mrr: {mrr:.4f}")
    print(f"wall_s: {time.time() - t0:.1f}")
    return 0


if __name__ == "__main__":
    from jaxreco.runtime import configure_xla
    configure_xla()   # before JAX starts (jaxreco/runtime.py: XLA:CPU's scheduler can wedge solves)
    sys.exit(main())
