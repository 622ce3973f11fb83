import numpy as np
import pytest

from jaxreco.data.prepare import prepare


@pytest.fixture
def run_prepare(tmp_path):
    """prepare(dataset, **prepare options) into tmp_path/<name>; returns (metadata, path)."""
    def run(dataset: dict, name: str = "out", **prep):
        out = str(tmp_path / name)
        prep.setdefault("progress", False)
        meta = prepare({"dataset": dataset, "prepare": {"output_dir": out, **prep}})
        return meta, out
    return run


def write_csv(path, header, rows):
    path.write_text("\n".join([header] + rows) + "\n")
    return str(path)


SYN = {"name": "synthetic-ecommerce", "num_interactions": 30_000, "num_users": 300,
       "num_items": 200, "num_categories": 8, "seed": 3}
