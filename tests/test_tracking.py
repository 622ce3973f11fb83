"""Unit tests of run tracking (HParams sessions, failure records, provenance) and of the
process layout read from SLURM / submitit environments. No training, no TensorFlow."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jaxreco import distributed, tracking
from jaxreco.compare import read_scalars

CFG = OmegaConf.create({
    "name": "t", "seed": 3,
    "model": {"name": "mf", "dim": 16, "reg": 0.05},
    "optimizer": {"name": "lazy_adam", "lr": 0.002},
    "trainer": {"batch_size": 128, "progress_bar": True, "max_steps": None, "checkpoint": True},
    "dataset": {"name": "movielens-100k", "path": None, "data_dir": "/cache",
                "rating_range": [1.0, 5.0]},
    "logger": {"tensorboard": True},
    "flag": False,
})
RESULTS = {"val/rmse": 0.91, "test/rmse": 0.93, "train/steps": 40, "train/stopped_early": True,
           "perf/train_seconds": 1.5}


def _events(d: Path):
    """Every Event proto in the event files of directory ``d``."""
    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted(d.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return out


def _session(d: Path):
    from tensorboard.plugins.hparams import metadata

    start = end = None
    for ev in _events(d):
        for v in ev.summary.value:
            if v.tag == metadata.SESSION_START_INFO_TAG:
                start = metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
            elif v.tag == metadata.SESSION_END_INFO_TAG:
                end = metadata.parse_session_end_info_plugin_data(v.metadata.plugin_data.content)
    return start, end


def test_hparams_of_drops_bookkeeping_keys():
    hp = tracking.hparams_of(CFG)
    assert hp["model.dim"] == 16 and hp["optimizer.lr"] == 0.002 and hp["seed"] == 3
    assert hp["dataset.rating_range"] == "[1.0, 5.0]" and hp["dataset.path"] is None
    assert not {"logger.tensorboard", "trainer.progress_bar", "trainer.checkpoint",
                "dataset.data_dir"} & set(hp)


def test_write_hparams_one_session_typed_values_and_metrics(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    tb = tmp_path / "tb"
    tracking.write_hparams(tb, CFG, RESULTS)
    tracking.write_hparams(tb, CFG, {**RESULTS, "val/rmse": 0.89})   # a rerun replaces it
    # one session file in the run's own directory (TensorBoard lists the run once)
    assert [p.name.endswith(".hparams") for p in tb.glob("events.out.tfevents.*")] == [True]
    assert not (tb / "hparams").exists()
    start, end = _session(tb)
    hp = start.hparams
    assert hp["model.dim"].number_value == 16 and hp["model.name"].string_value == "mf"
    assert hp["flag"].WhichOneof("kind") == "bool_value" and hp["flag"].bool_value is False
    assert hp["dataset.path"].string_value == "null" and "logger.tensorboard" not in hp
    assert end.status == api_pb2.STATUS_SUCCESS
    scalars = read_scalars(tb)
    assert scalars["val/rmse"] == [(40, pytest.approx(0.89))]
    assert scalars["train/stopped_early"] == [(40, 1.0)]
    assert set(scalars) == set(RESULTS)


def test_write_failure_records_error_and_a_failed_session(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    try:
        raise ValueError("optimizer.name='nope' is unknown\nsecond line")
    except ValueError as e:
        err = e
    info = tracking.write_failure(tmp_path, CFG, err, job={"num": 2, "overrides": ["a=1"]})
    saved = json.loads((tmp_path / "error.json").read_text())
    assert saved["type"] == "ValueError" and saved["message"] == "optimizer.name='nope' is unknown"
    assert saved["job"] == {"num": 2, "overrides": ["a=1"]} and "Traceback" in saved["traceback"]
    assert info["message"] == saved["message"]
    assert (tmp_path / "FAILED").read_text() == "ValueError: optimizer.name='nope' is unknown\n"
    start, end = _session(tmp_path / "tb")
    assert start.hparams["model.dim"].number_value == 16
    assert end.status == api_pb2.STATUS_FAILURE
    # Another process of the same job leaves its own record and does not touch process 0's.
    tracking.write_failure(tmp_path, CFG, RuntimeError("peer"), process_index=1)
    assert json.loads((tmp_path / "error.process1.json").read_text())["message"] == "peer"
    assert json.loads((tmp_path / "error.json").read_text())["type"] == "ValueError"


def test_git_info(tmp_path):
    info = tracking.git_info()
    assert re.fullmatch(r"[0-9a-f]{40}", info["commit"]) and isinstance(info["dirty"], bool)
    assert tracking.git_info(tmp_path) == {"commit": None, "dirty": None}


def test_read_scalars_matches_tensorboardx_writer(tmp_path):
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        for step, v in [(1, 0.5), (2, 0.25), (2, 0.2)]:          # a rewritten step: last wins
            w.add_scalar("train/loss", v, step)
    assert read_scalars(tmp_path) == {"train/loss": [(1, 0.5), (2, pytest.approx(0.2))]}


# ---------------------------------------------------------------------- distributed

@pytest.mark.parametrize("nodes, host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("gpu-[003-005,010],cpu1", "gpu-003"),
    ("a[7,9]", "a7"),
])
def test_first_host_of_slurm_nodelist(nodes, host):
    assert distributed.first_host(nodes) == host


def test_detect_reads_slurm_submitit_and_explicit_layouts():
    slurm = {"SLURM_STEP_NODELIST": "gpu[12-13]", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "9",
             "SLURM_PROCID": "3", "SLURM_JOB_ID": "123456"}
    assert distributed.detect(slurm) == distributed.ProcessEnv(4, 3, "gpu12:23456", "slurm")
    assert distributed.detect({**slurm, "JAXRECO_COORDINATOR_PORT": "7000"}).coordinator_address \
        == "gpu12:7000"
    local = {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
             "SUBMITIT_LOCAL_JOB_ID": "31337"}
    assert distributed.detect(local) == distributed.ProcessEnv(2, 1, "127.0.0.1:31337",
                                                               "submitit-local")
    explicit = {"JAXRECO_COORDINATOR_ADDRESS": "h:1", "JAXRECO_NUM_PROCESSES": "2",
                "JAXRECO_PROCESS_ID": "0", **slurm}
    assert distributed.detect(explicit).source == "explicit"
    assert distributed.detect({}) == distributed.ProcessEnv()
    # An sbatch script outside srun (no step variables) is one process.
    assert distributed.detect({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}).num_processes == 1


def test_detect_bad_input_names_the_variable():
    with pytest.raises(ValueError, match="give all of coordinator_address"):
        distributed.detect({}, num_processes=2)
    with pytest.raises(ValueError, match=r"SLURM_PROCID='x': expected an integer"):
        distributed.detect({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2", "SLURM_PROCID": "x"})
    with pytest.raises(ValueError, match=r"process_id=5 is outside 0\.\.1"):
        distributed.initialize_from_env("127.0.0.1:1", 2, 5)


def test_initialize_from_env_single_process_is_a_no_op():
    pe = distributed.initialize_from_env(env={})
    assert pe.num_processes == 1 and not distributed.is_initialized()


def test_write_json_is_strict_json_with_nan_as_null(tmp_path):
    p = tmp_path / "metrics.json"
    tracking.write_json(p, {"train/loss": float("nan"), "x": [1.0, float("inf")], "ok": 0.5})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"train/loss": None, "x": [1.0, None], "ok": 0.5}
