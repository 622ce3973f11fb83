"""Product questions (``/ask``): item texts, price filters, BM25 retrieval and the personal
re-rank (jaxreco.ask), and ``POST /ask`` on a served model (jaxreco.serve.ask)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import types

import numpy as np
import pytest

pytest.importorskip("bm25s", reason="/ask needs the [ask] extra")

from jaxreco import ask  # noqa: E402

COLOURS = ("red", "blue", "green")
KINDS = ("shoe", "bag", "coat")


def _text(n=90, prices=True) -> ask.ItemText:
    """Item ``i``: title ``<colour> <kind> <i>``, tag ``cat<i % 5>``, price ``i`` (items
    ``i % 10 == 7`` of unknown price)."""
    title = [f"{COLOURS[i % 3]} {KINDS[(i // 3) % 3]} model{i}" for i in range(n)]
    tags = [f"cat{i % 5}" for i in range(n)]
    price = np.asarray([np.nan if i % 10 == 7 else float(i) for i in range(n)])
    return ask.ItemText(title, tags, price if prices else np.full(n, np.nan))


# ----------------------------------------------------------------------------- retrieval
def test_bm25_finds_the_items_whose_text_has_the_words():
    t = _text()
    cat = ask.Catalogue(t)
    top, s = cat.ask("red shoe", 90)
    full = [i for i in range(90) if i % 3 == 0 and (i // 3) % 3 == 0]     # red and shoe
    assert sorted(top[:len(full)].tolist()) == full                       # both words first
    assert all(("red" in t.title[i]) or ("shoe" in t.title[i]) for i in top)
    assert len(top) == sum(1 for x in t.title if "red" in x or "shoe" in x)
    assert (np.diff(s) <= 1e-9).all()                                     # BM25 order
    top, _ = cat.ask("model42", 5)
    assert top.tolist() == [42]                                          # a title's own word
    assert cat.ask("cat3", 100)[0].tolist() == list(range(3, 90, 5))      # a tag, ties by index
    assert cat.ask("zeppelin", 10)[0].size == 0                           # no known word: nothing
    with pytest.raises(ask.AskError, match="no words"):
        cat.ask("   ", 10)


def test_price_filters_are_cut_from_the_query_and_applied():
    q = ask.parse_query("red shoes under $20 and over 5")
    assert (q.text, q.min_price, q.max_price) == ("red shoes and", 5.0, 20.0)
    q = ask.parse_query("Bag between 30 and 10")
    assert (q.text, q.min_price, q.max_price) == ("Bag", 10.0, 30.0)
    assert ask.parse_query("coat < 12.5").max_price == 12.5
    assert not ask.parse_query("blue coat").has_filter
    cat = ask.Catalogue(_text())
    top, _ = cat.ask("shoe under 20", 90)
    want = [i for i in range(21) if (i // 3) % 3 == 0 and i % 10 != 7]    # unknown price: out
    assert sorted(top.tolist()) == want
    top, _ = cat.ask("between 80 and 85", 90)                             # a filter alone
    assert sorted(top.tolist()) == [80, 81, 82, 83, 84, 85]
    with pytest.raises(ask.AskError, match=r"no prices, so a price filter \(max 20.0\)"):
        ask.Catalogue(_text(prices=False)).ask("shoe under 20", 10)


def test_personal_scores_reorder_the_candidates_by_the_mix_chosen():
    cat = ask.Catalogue(_text())
    rng = np.random.default_rng(0)
    p = rng.normal(size=90)
    blue = [i for i in range(90) if i % 3 == 1]          # one word: equal BM25 scores
    top, _ = cat.ask("blue", 90, p)
    assert top.tolist() == sorted(blue, key=lambda i: -p[i])              # personal decides
    top, _ = cat.ask("blue", 90, p, weight=0.0)
    assert top.tolist() == blue                                           # text only: by index
    # two words: the mix trades text against the personal score, exactly as documented
    cand, s = cat.candidates(ask.parse_query("blue bag"))
    w = 0.3
    key = (1 - w) * ask.zscore(s[cand]) + w * ask.zscore(p[cand])
    top, _ = cat.ask("blue bag", 90, p, weight=w)
    assert top.tolist() == cand[np.argsort(-key, kind="stable")].tolist()
    assert top.tolist() != cat.ask("blue bag", 90)[0].tolist()           # it did change
    p2 = p.copy()
    p2[blue[0]] = np.nan                                                  # excluded for them
    assert blue[0] not in cat.ask("blue", 90, p2)[0].tolist()


def test_item_text_file_round_trips_and_names_bad_fields(tmp_path):
    t = _text(12)
    back = ask.ItemText.from_bytes(t.to_bytes())
    assert back.title == t.title and back.tags == t.tags
    np.testing.assert_array_equal(back.price, t.price)
    with pytest.raises(ask.AskError, match=r"x.json: price\[1\]='9' is not a number"):
        ask.ItemText.from_bytes(b'{"format": 1, "title": ["a", "b"], "tags": ["", ""], '
                                b'"price": [1, "9"]}', "x.json")
    with pytest.raises(ask.AskError, match="2 titles, 1 tags"):
        ask.ItemText(["a", "b"], ["x"], [1.0, 2.0])
    with pytest.raises(ask.AskError, match="field 'tags' must be a list"):
        ask.ItemText.from_bytes(b'{"format": 1, "title": [], "price": []}')


def test_movielens_titles_and_genres_and_categories_become_item_text(tmp_path):
    (tmp_path / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat (1995)::Action|Crime\n"
        "3::Amélie (2001)::Comedy|Romance\n".encode("latin-1"))
    t = ask.item_text_of({"name": "movielens-1m", "path": str(tmp_path)}, ["2", "3", "9"])
    assert t.title == ["Heat (1995)", "Amélie (2001)", "9"]
    assert t.tags == ["Action Crime", "Comedy Romance", ""]
    assert not t.has_price
    t = ask.item_text_of({"name": "synthetic-ecommerce"}, ["a", "b"], ["shoes", "bags"],
                         np.array([3.0, np.nan]))
    assert t.tags == ["shoes", "bags"] and t.has_price
    assert ask.item_text_of({"name": "synthetic-ecommerce"}, ["a"], None) is None
    assert ask.item_text_of({"name": "synthetic-ecommerce"}, ["a"], [""]) is None


# ---------------------------------------------------------------------- served: POST /ask
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An MF model exported with fold-in sessions and the item texts of :func:`_text`;
    rules exclude item 4."""
    pytest.importorskip("tensorflow", reason="serving tests need tensorflow-cpu")
    pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")
    import json

    from jaxreco import foldin
    from jaxreco.export import SessionModel
    from tests import test_export_support as S

    data = S.make_mf(num_items=90, seed=2, baskets=False, categories=False)
    p = data.params
    f = foldin.FoldIn(p["item_embed"], p["item_bias"][:, 0], None, alpha0=0.3, reg=0.05, nu=1.0)
    tmp = tmp_path_factory.mktemp("ask")
    S.export(data, tmp / "models", 1, session=SessionModel("foldin", foldin=f),
             assets_extra={ask.ITEM_TEXT_FILE: _text().to_bytes()})
    (tmp / "rules.json").write_text(json.dumps({"exclude_items": [data.item_id(4)]}))
    server = S.Server(tmp / "models", tmp / "server.log", "--rules", str(tmp / "rules.json"))
    try:
        server.wait()
        yield server.client, data
    finally:
        server.stop()


def test_ask_endpoint_text_user_session_and_price(served):
    client, data = served
    cat = ask.Catalogue(_text())
    idx = {data.item_id(i): i for i in range(90)}
    st, body = client.post("/ask", {"query": "Blue bag", "k": 8})
    assert st == 200, body
    assert not body["personalised"] and body["words"] == ["blue", "bag"]
    # no personal scores: text mixed with the model's cold-start popularity, rules applied
    assert body["reranked_by"] == "popularity"
    pop = data.popularity().astype(np.float64)
    exclude = np.zeros(90, bool)
    exclude[4] = True
    want = cat.ask("blue bag", 8, pop, ask.POPULAR_WEIGHT, exclude)[0].tolist()
    assert [idx[x["item"]] for x in body["items"]] == want
    assert want != [i for i in cat.ask("blue bag", 9)[0].tolist() if i != 4][:8]  # not text order
    assert [x["popularity"] for x in body["items"]] == [pop[i] for i in want]
    # a known user: their scores re-rank, their seen items are left out
    u = 3
    st, body = client.post("/ask", {"query": "blue bag", "k": 90, "user": data.user_vocab[u]})
    assert st == 200 and body["personalised"] and body["user_known"], body
    assert body["reranked_by"] == "personal"
    got = [idx[x["item"]] for x in body["items"]]
    scores = data.all_scores()[u].astype(np.float64)
    personal = np.where(np.isin(np.arange(90), list(data.seen(u))), np.nan, scores)
    assert got == cat.ask("blue bag", 90, personal, exclude=exclude)[0].tolist()
    assert not set(got) & data.seen(u) and 4 not in got
    for x in body["items"]:
        assert abs(x["personal_score"] - scores[idx[x["item"]]]) < 1e-4
    # an anonymous session: folded in, its items left out
    sess = [data.item_id(i) for i in (1, 10, 13)]
    st, body = client.post("/ask", {"query": "blue", "k": 30, "session": sess})
    assert st == 200 and body["personalised"] and body["session_known"] == 3, body
    got = [idx[x["item"]] for x in body["items"]]
    assert not {1, 10, 13} & set(got)
    assert got != [i for i in cat.ask("blue", 40)[0].tolist() if i not in (1, 4, 10, 13)][:30]
    st, body = client.post("/ask", {"query": "blue", "k": 5, "session": ["nope"], "user": 7})
    assert st == 200 and body["session_known"] == 0 and not body["personalised"], body
    assert body["user_known"] is False
    # price filter; unknown user: popularity re-rank
    st, body = client.post("/ask", {"query": "coat under 30", "k": 50, "user": "nobody"})
    assert st == 200 and body["user_known"] is False and not body["personalised"], body
    assert body["max_price"] == 30 and body["items"]
    assert all(x["price"] <= 30 and "coat" in x["title"] for x in body["items"])


def test_ask_endpoint_bad_input_is_a_422_naming_the_field(served):
    client, _ = served
    for req, field in [({"query": "x", "k": 0}, "k"), ({"query": 3}, "query"),
                       ({"k": 3}, "query"), ({"query": "x", "user": [1]}, "user"),
                       ({"query": "x", "colour": "red"}, "colour")]:
        st, body = client.post("/ask", req)
        assert st == 422 and body["error"].startswith(field), (req, body)


def test_a_version_without_item_text_answers_409(tmp_path):
    pytest.importorskip("fastapi", reason="serving tests need the [serve] extra")
    from starlette.exceptions import HTTPException

    from jaxreco.serve import ask as serve_ask

    (tmp_path / "assets.extra").mkdir()
    m = types.SimpleNamespace(path=tmp_path, version=7, num_items=3)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        router = serve_ask.make_router(lambda: m, ex)
        endpoint = next(r.endpoint for r in router.routes if r.path == "/ask")
        with pytest.raises(HTTPException) as e:
            asyncio.run(endpoint(body={"query": "red"}))
        assert e.value.status_code == 409 and "version 7 has no item text" in e.value.detail
        (tmp_path / "assets.extra" / ask.ITEM_TEXT_FILE).write_bytes(_text(2).to_bytes())
        m2 = types.SimpleNamespace(path=tmp_path, version=8, num_items=3)
        router = serve_ask.make_router(lambda: m2, ex)
        endpoint = next(r.endpoint for r in router.routes if r.path == "/ask")
        with pytest.raises(HTTPException) as e:
            asyncio.run(endpoint(body={"query": "red"}))
        assert e.value.status_code == 500 and "has 2 items, the model 3" in e.value.detail


@pytest.mark.slow
def test_cli_exports_carry_item_text_titles_genres_categories_and_prices(tmp_path):
    """``jaxreco-export`` writes ``item_text.json`` for a MovieLens run with ``movies.dat``
    (titles, genres) and for a synthetic run (category names, prices), none for a dataset
    without text; the price filter then works on the exported catalogue."""
    pytest.importorskip("tensorflow", reason="export tests need tensorflow-cpu")
    from tests.conftest import cli_train_export, write_ratings_dat, write_u_data

    ml = write_ratings_dat(tmp_path / "ml1m", num_users=40, num_items=30, n=900)
    genres = ("Comedy", "Drama|Romance", "Action|Sci-Fi")
    (ml / "movies.dat").write_text("".join(f"{i}::Movie {i} (199{i % 10})::{genres[i % 3]}\n"
                                           for i in range(0, 200)))
    env = {"JAXRECO_CACHE": str(tmp_path / "cache")}
    runs = {"ml": ["dataset=movielens-1m", f"dataset.path={ml}"],
            "synthetic": ["experiment=synthetic_ctr", "dataset.num_interactions=20000",
                          "dataset.num_users=200", "dataset.num_items=100"],
            "notext": [f"dataset.path={write_u_data(tmp_path / 'ml-tiny')}"]}
    cli_train_export(tmp_path, runs, env)

    def exported(name):
        v = tmp_path / f"models-{name}" / "1"
        ids = (v / "assets" / "item_vocab.txt").read_text().split("\n")[:-1]
        f = v / "assets.extra" / ask.ITEM_TEXT_FILE
        return ids, (ask.ItemText.load(f) if f.is_file() else None)

    ids, t = exported("ml")
    assert len(t) == len(ids) and not t.has_price
    for i, title, tags in zip(ids, t.title, t.tags):
        assert title == f"Movie {i} (199{int(i) % 10})" and tags == genres[int(i) % 3].replace("|", " ")
    top, _ = ask.Catalogue(t).ask("sci-fi", 100)
    assert sorted(top.tolist()) == [j for j, i in enumerate(ids) if int(i) % 3 == 2]
    ids, t = exported("synthetic")
    assert t.has_price and len(set(t.tags)) > 5 and all(t.tags)
    top, _ = ask.Catalogue(t).ask(f"under {np.nanmedian(t.price)}", 1000)
    assert 0 < len(top) < len(ids) and (t.price[top] <= np.nanmedian(t.price)).all()
    assert exported("notext")[1] is None
