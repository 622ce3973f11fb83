"""Helpers shared by the export and serving tests (no tests here).

A tiny biased matrix-factorization model with the layout the real MF model has
(``user_embed [U,d]``, ``item_embed [I,d]``, ``user_bias [U,1]``, ``item_bias [I,1]``,
``global_bias []``), deterministic training data (seen items, baskets, categories), an
export helper, and loop-based reference rankings written independently of the code under
test. Loaded by path (``load_support()``) so it works whether or not ``tests`` is a package.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Prepended to ``python -c`` programs: any import of jax/jaxlib fails in that process.
BLOCK_JAX = """
import sys
class _BlockJax:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib"):
            raise ImportError(f"jax is blocked in this process (tried to import {name})")
sys.meta_path.insert(0, _BlockJax())
"""


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("XLA_FLAGS", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mf_functions():
    """``score_fn``, ``user_item_scores_fn``, ``item_vectors_fn`` of biased MF, in JAX."""
    from jaxreco.export import biased_mf_functions

    return biased_mf_functions()


@dataclasses.dataclass
class MFData:
    params: dict
    user_vocab: np.ndarray
    item_vocab: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    co: tuple | None
    categories: list | None

    @property
    def num_users(self):
        return len(self.user_vocab)

    @property
    def num_items(self):
        return len(self.item_vocab)

    def seen(self, u: int) -> set[int]:
        return set(self.indices[self.indptr[u]:self.indptr[u + 1]].tolist())

    def popularity(self) -> np.ndarray:
        return np.bincount(self.indices, minlength=self.num_items).astype(np.float32)

    def all_scores(self) -> np.ndarray:
        """[U, I] scores computed with JAX (the reference the SavedModel must match)."""
        import jax
        _, all_fn, _ = mf_functions()
        return np.asarray(jax.jit(all_fn)(self.params, np.arange(self.num_users, dtype=np.int32)))

    def item_id(self, i: int) -> str:
        return str(self.item_vocab[i])


def make_mf(num_users=120, num_items=90, dim=8, seed=0, baskets=True, categories=True) -> MFData:
    rng = np.random.default_rng(seed)
    params = {
        "user_embed": rng.normal(0, 0.5, (num_users, dim)).astype(np.float32),
        "item_embed": rng.normal(0, 0.5, (num_items, dim)).astype(np.float32),
        "user_bias": rng.normal(0, 0.2, (num_users, 1)).astype(np.float32),
        "item_bias": rng.normal(0, 0.2, (num_items, 1)).astype(np.float32),
        "global_bias": np.asarray(3.5 + seed, np.float32),
    }
    user_vocab = np.asarray([f"u{i}" for i in range(num_users)], dtype=object)
    user_vocab[1] = "user with spaces"
    user_vocab[2] = "ユーザー-2"
    item_vocab = np.asarray([str(1000 + i) for i in range(num_items)], dtype=object)
    item_vocab[3] = "sku/3 blue"
    lens = rng.integers(0, min(25, num_items - 1), num_users)
    lens[0] = num_items - 3  # user 0 has seen all but 3 items: lists shorter than k
    lens[4] = 0
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(num_items, n, replace=False)) for n in lens]
                             ).astype(np.int32)
    co = None
    if baskets:
        rows = []
        for i in range(num_items):
            n = int(rng.integers(0, 4))
            partners = rng.choice([j for j in range(num_items) if j != i], n, replace=False)
            rows.append(sorted((int(j), int(rng.integers(1, 6))) for j in partners))
        co_indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        co = (co_indptr, np.asarray([j for r in rows for j, _ in r], np.int32),
              np.asarray([c for r in rows for _, c in r], np.int32))
    cats = [f"cat{i % 5}" for i in range(num_items)] if categories else None
    return MFData(params, user_vocab, item_vocab, indptr, indices, co, cats)


def export(data: MFData, out_dir, version: int, **kw) -> Path:
    from jaxreco.export import export_saved_model

    score, all_fn, vec = mf_functions()
    return export_saved_model(
        out_dir, version, params=data.params, score_fn=score, user_item_scores_fn=all_fn,
        item_vectors_fn=vec, user_vocab=data.user_vocab, item_vocab=data.item_vocab,
        seen=(data.indptr, data.indices), co_counts=data.co, item_category=data.categories, **kw)


# --------------------------------------------------------------------- references (loops)
def ref_recommend(data: MFData, scores_row: np.ndarray | None, user: int | None, k: int, *,
                  exclude=(), boost=None, cap=None) -> list[int]:
    """Top-k item indices by a plain loop: seen/excluded dropped, boosts added, category cap.

    ``user=None`` is a cold-start user: ``scores_row`` is ignored, popularity ranks."""
    boost = boost or {}
    if user is None:
        base, seen = data.popularity().astype(np.float64), set()
    else:
        base, seen = scores_row.astype(np.float64), data.seen(user)
    cand = []
    for i in range(data.num_items):
        if i in seen or i in exclude:
            continue
        cand.append((-(base[i] + boost.get(i, 0.0)), i))
    cand.sort()
    out, per_cat = [], {}
    for _, i in cand:
        if cap is not None:
            c = data.categories[i]
            if per_cat.get(c, 0) >= cap:
                continue
            per_cat[c] = per_cat.get(c, 0) + 1
        out.append(i)
        if len(out) == k:
            break
    return out


def ref_similar(data: MFData, item: int, k: int, exclude=()) -> list[int]:
    """Co-purchase count first, then cosine, both descending; the item itself dropped."""
    v = data.params["item_embed"].astype(np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ v[item]
    co = np.zeros(data.num_items, np.int64)
    if data.co is not None:
        ip, ix, d = data.co
        co[ix[ip[item]:ip[item + 1]]] = d[ip[item]:ip[item + 1]]
    order = sorted((i for i in range(data.num_items) if i != item and i not in exclude),
                   key=lambda i: (-co[i], -cos[i], i))
    return order[:k]


def same_ranking(got: list[int], want: list[int], scores: np.ndarray, tol=1e-5) -> bool:
    """Equal lists, allowing swaps only between items whose scores tie within ``tol``."""
    if len(got) != len(want):
        return False
    if got == want:
        return True
    return sorted(got) == sorted(want) and all(
        abs(scores[a] - scores[b]) <= tol for a, b in zip(got, want) if a != b)


def load_support():
    return sys.modules[__name__]


# --------------------------------------------------------------------- a served model
class Client:
    """Minimal JSON client over one keep-alive connection to 127.0.0.1 (stdlib only)."""

    def __init__(self, port: int, timeout: float = 30):
        import http.client
        self.port, self.timeout = port, timeout
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None):
        import http.client
        import json as _json
        if body is not None and not isinstance(body, (bytes, str)):
            body = _json.dumps(body)
        for attempt in (0, 1):
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                r = self._conn.getresponse()
                raw = r.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                if attempt:
                    raise
        if r.getheader("connection", "").lower() == "close":
            self._conn.close()
        try:
            data = _json.loads(raw) if raw else None
        except ValueError:
            data = raw
        return r.status, data

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body, headers=None):
        return self.request("POST", path, body, headers)

    def close(self):
        self._conn.close()


class Server:
    """``jaxreco-serve`` in a subprocess where importing jax fails."""

    def __init__(self, model_dir, log_path, *args: str):
        import subprocess
        self.port = free_port()
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        program = BLOCK_JAX + "from jaxreco.serve.cli import main\nsys.exit(main())\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", program, "--model-dir", str(model_dir), "--port", str(self.port),
             "--log-level", "warning", *args],
            env=subprocess_env(), cwd=str(REPO), stdout=self._log, stderr=subprocess.STDOUT)
        self.client = Client(self.port)

    def wait(self, path="/readyz", status=200, timeout=120.0):
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                st, _ = Client(self.port, timeout=5).get(path)
                if st == status:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{path} did not answer {status} in {timeout} s:\n{self.log()[-3000:]}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def mapped_files(self) -> set[str]:
        out = set()
        for line in Path(f"/proc/{self.proc.pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                out.add(parts[5])
        return out

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
