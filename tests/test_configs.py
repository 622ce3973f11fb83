"""Every config group option and every experiment composes and type-checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from jaxreco import config
from jaxreco.cli import CONF_DIR

config.register()
GROUPS = [p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"]


PRIMARY = {"prepare": "data"}     # groups of `jaxreco-data prepare`; the rest: `jaxreco-train`


def _compose(overrides, primary="train"):
    """Composes like the app does and resolves every interpolation (hydra's included)."""
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose(primary, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option",
                         [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    cfg = _compose([f"{group}={option}"], PRIMARY.get(group, "train"))
    # Datasets read from user-supplied paths (from-files) leave those paths mandatory (???).
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=group != "dataset")
    if group == "experiment":
        assert cfg.name == option
    if group == "dataset":
        assert cfg.dataset.name == option


def test_required_groups_exist():
    for g in ("dataset", "model", "optimizer", "trainer", "mesh", "logger", "experiment"):
        assert _options(g), g


def test_wrong_type_is_rejected_with_key():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["trainer.batch_size=abc"])
    assert "trainer.batch_size" in str(e.value)
    assert "could not be converted to Integer" in str(e.value.__cause__)


def test_unknown_key_and_option_are_rejected():
    with pytest.raises(ConfigCompositionException, match="trainer.bogus"):
        _compose(["trainer.bogus=1"])
    with pytest.raises(MissingConfigException, match="dataset/nope"):
        _compose(["dataset=nope"])


def test_experiment_readmes_match_configs():
    """experiments/<name>/README.md exists for every conf/experiment/<name>.yaml and back."""
    root = CONF_DIR.parent / "experiments"
    readmes = sorted(p.parent.name for p in root.glob("*/README.md"))
    assert readmes == _options("experiment")
    for name in readmes:
        text = (root / name / "README.md").read_text()
        assert f"experiment={name}" in text, f"{name}: README must give the command"


# ----------------------------------------------------------------------------- typed nodes
SCHEMA_OF_DATASET = {
    "movielens-100k": config.MovieLensConfig, "movielens-1m": config.MovieLensConfig,
    "from-files": config.FromFilesConfig, "instacart-sample": config.InstacartSampleConfig,
    "synthetic-ecommerce": config.SyntheticEcommerceConfig,
    "synthetic-coupons": config.SyntheticCouponsConfig,
    "zozotown-obd": config.ZozotownObdConfig, "events": config.EventsConfig,
}


def test_every_dataset_yaml_has_a_schema_and_a_source():
    from jaxreco.data import registry

    assert sorted(SCHEMA_OF_DATASET) == _options("dataset") == sorted(registry.SOURCES)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_typed_and_passes_validate(experiment):
    cfg = _compose([f"experiment={experiment}"])
    config.validate(cfg)
    assert OmegaConf.get_type(cfg.dataset) is SCHEMA_OF_DATASET[cfg.dataset.name]
    assert OmegaConf.get_type(cfg.task.prepare) is config.PrepareConfig
    assert OmegaConf.get_type(cfg.task.prepare.split) is config.PrepareSplitConfig
    assert isinstance(cfg.task.kind, config.TaskKind)
    assert "split" not in cfg.dataset       # the split is task.prepare.split, for every task


@pytest.mark.parametrize("dataset", _options("dataset"))
def test_typed_dataset_node_gives_the_plain_dict_of_its_yaml(dataset):
    """The node's plain dict is what the YAML says (prepared datasets are keyed by its hash)."""
    cfg = _compose([f"dataset={dataset}"], "data")
    node = OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True)
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dataset" / f"{dataset}.yaml"))
    raw.pop("defaults")
    if dataset.startswith("movielens"):   # the YAML names it; the schema has the rest
        raw.update(path=None, data_dir=None, rating_range=[1.0, 5.0])
    assert node == raw
    assert json.dumps(node, sort_keys=True) == json.dumps(raw, sort_keys=True)
    # enum members (to_container without enum_to_str) serialise to the same JSON
    members = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert json.dumps(members, sort_keys=True, default=str) == json.dumps(raw, sort_keys=True)


def test_prepare_node_is_the_schema_defaults_as_plain_data():
    from jaxreco.data.prepare import DEFAULTS

    cfg = _compose([], "data")
    assert OmegaConf.get_type(cfg.prepare) is config.PrepareConfig
    assert OmegaConf.to_container(cfg.prepare, enum_to_str=True) == DEFAULTS
    assert OmegaConf.to_container(_compose([]).task.prepare, enum_to_str=False) != {}


def test_rating_experiments_read_the_prepared_random_global_split():
    for experiment in ("ml100k_mf", "ml1m_mf", "ml1m_mf_bpmf"):
        p = _compose([f"experiment={experiment}"]).task.prepare
        assert p.dedup == "none" and p.negatives.num == 0
        assert (p.split.kind, p.split.test_fraction, p.split.val_fraction, p.split.seed) == \
            ("random_global", 0.1, 0.05, 0)


def test_enum_options_behave_as_their_strings():
    cfg = _compose(["experiment=ml1m_ncf_mf"])
    kind, name = cfg.task.kind, cfg.optimizer.name
    assert kind == "implicit" and kind != "rating" and isinstance(kind, str)
    assert {"ials": 1}[name] == 1 and name in ("ials",)
    assert f"{name}" == str(name) == "ials" and repr(name) == "'ials'"
    assert cfg.model.combiner == "dot" and str(cfg.model.combiner) == "dot"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert type(plain["task"]["kind"]) is str and plain["task"]["prepare"]["split"]["kind"] == \
        "leave_last_out"
    members = OmegaConf.to_container(cfg, resolve=True)      # as tracking.py flattens it
    assert json.dumps(members, sort_keys=True, default=str) == json.dumps(plain, sort_keys=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)               # as config.yaml is saved
    assert "kind: implicit" in text and "name: ials" in text and "Kind" not in text
    reloaded = OmegaConf.create(text)
    assert reloaded.task.kind == "implicit" and type(reloaded.task.kind) is str


# ----------------------------------------------------------------------------- validate
def _error(overrides):
    cfg = _compose(overrides)
    with pytest.raises(ValueError) as e:
        config.validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


EMBED = ["model=embed_mlp"]
BAD = [
    (["trainer.batch_size=-1"], "trainer.batch_size=-1: must be an integer >= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be an integer >= 1"),
    (["trainer.epochs=0"], "trainer.epochs=0: must be an integer >= 1"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0: must be an integer >= 1"),
    (["trainer.log_every_steps=0"], "trainer.log_every_steps=0: must be an integer >= 1"),
    (["trainer.patience=-1"], "trainer.patience=-1: must be an integer >= 0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be an integer >= 1, or null"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints=0: must be an integer >= 1"),
    (["trainer.checkpoint_every_steps=-5"],
     "trainer.checkpoint_every_steps=-5: must be an integer >= 0"),
    (["model.dim=0"], "model.dim=0: must be an integer >= 1"),
    ([*EMBED, "model.mf_dim=0"], "model.mf_dim=0: must be an integer >= 1"),
    ([*EMBED, "model.mlp_dims=[64,0]"], "model.mlp_dims[1]=0: must be an integer >= 1"),
    (["model.reg=-0.1"], "model.reg=-0.1: must be >= 0"),
    (["model.bias_reg=-1"], "model.bias_reg=-1.0: must be >= 0"),
    (["model.init_std=-0.01"], "model.init_std=-0.01: must be >= 0"),
    (["model.row_multiple=0"], "model.row_multiple=0: must be an integer >= 1"),
    ([*EMBED, "model.pretrained_alpha=1.5"], "model.pretrained_alpha=1.5: must be in [0, 1]"),
    ([*EMBED, "model.heads=[clik]"],
     "model.heads[0]=clik: must be one of ['click', 'purchase', 'rating']"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: must be >= 0"),
    (["optimizer.dense_lr=-0.001"], "optimizer.dense_lr=-0.001: must be >= 0"),
    (["optimizer.unobserved_weight=-1"], "optimizer.unobserved_weight=-1.0: must be >= 0"),
    (["optimizer.recency_half_life=0"], "optimizer.recency_half_life=0.0: must be > 0"),
    (["optimizer.recency_weight=-2"], "optimizer.recency_weight=-2.0: must be >= 0"),
    (["task.kind=implicit", "task.num_negatives=0"],
     "task.num_negatives=0: must be an integer >= 1"),
    (["task.num_negatives=-1"], "task.num_negatives=-1: must be an integer >= 0"),
    (["task.ks=[10,0]"], "task.ks[1]=0: must be an integer >= 1"),
    (["task.eval_chunk_elements=0"], "task.eval_chunk_elements=0: must be an integer >= 1"),
    (["task.pop_alpha=-0.5"], "task.pop_alpha=-0.5: must be >= 0"),
    (["task.prepare.split.test_fraction=1.0"],
     "task.prepare.split.test_fraction=1.0: must be in [0, 1)"),
    (["task.prepare.split.val_fraction=-0.1"],
     "task.prepare.split.val_fraction=-0.1: must be in [0, 1)"),
    (["task.prepare.split.test_fraction=0.5", "task.prepare.split.val_fraction=0.5"],
     "task.prepare.split.test_fraction + task.prepare.split.val_fraction = 0.5 + 0.5 = 1.0: "
     "must be < 1"),
    (["task.prepare.split.num_val=-1"], "task.prepare.split.num_val=-1: must be an integer >= 0"),
    (["task.prepare.split.num_test=-1"],
     "task.prepare.split.num_test=-1: must be an integer >= 0"),
    (["task.prepare.split.min_train=0"],
     "task.prepare.split.min_train=0: must be an integer >= 1"),
    (["task.prepare.negatives.num=-1"], "task.prepare.negatives.num=-1: must be an integer >= 0"),
    (["task.prepare.min_user_interactions=-1"],
     "task.prepare.min_user_interactions=-1: must be an integer >= 0"),
    (["task.prepare.min_item_interactions=-1"],
     "task.prepare.min_item_interactions=-1: must be an integer >= 0"),
    (["task.prepare.num_buckets=0"], "task.prepare.num_buckets=0: must be an integer >= 1, or null"),
    (["task.prepare.rating_min=5", "task.prepare.rating_max=1"],
     "task.prepare.rating_min=5.0 > task.prepare.rating_max=1.0: the minimum must not exceed "
     "the maximum"),
    (["mesh.axes.data=0"], "mesh.axes.data=0: must be an integer >= 1, or -1 (the remaining "
                           "devices)"),
    (["mesh.axes.model=-2"], "mesh.axes.model=-2: must be an integer >= 1, or -1 (the "
                             "remaining devices)"),
    (["mesh=dp", "mesh.axes.model=-1"],
     "mesh.axes={'data': -1, 'model': -1}: at most one axis may be -1, got ['data', 'model']"),
    (["dataset=synthetic-ecommerce", "dataset.num_users=0"],
     "dataset.num_users=0: must be an integer >= 1"),
    (["dataset.rating_range=[5,1]"],
     "dataset.rating_range=[5.0, 1.0]: must be [low, high] with low <= high"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_each_bad_value_gives_one_line_naming_key_value_and_range(overrides, message):
    assert _error(overrides) == message


def test_values_at_the_edge_of_their_range_pass():
    # iALS has no learning rate; a rating task samples no negatives; learning rates 0 keep
    # the initial (pre-trained) parameters
    config.validate(_compose(["experiment=ml1m_ncf_mf", "optimizer.lr=-1", "optimizer.dense_lr=-1"]))
    config.validate(_compose(["task.num_negatives=0", "optimizer.lr=0", "optimizer.dense_lr=0"]))
    config.validate(_compose(["trainer.patience=0", "trainer.max_steps=1", "model.reg=0",
                              "task.prepare.split.test_fraction=0", "mesh=dp",
                              "task.prepare.num_buckets=1", "trainer.checkpoint_every_steps=0"]))


def test_missing_mandatory_value_is_reported_by_validate():
    assert _error(["dataset=from-files"]) == (
        "missing mandatory config values (???): dataset.train; set them on the command line, "
        "e.g. dataset.train=...")


def test_data_config_is_validated_too():
    cfg = _compose(["prepare.split.val_fraction=1"], "data")
    with pytest.raises(ValueError, match=r"^prepare.split.val_fraction=1.0: must be in \[0, 1\)$"):
        config.validate(cfg)


@pytest.mark.parametrize("override, key", [
    ("task.prepare.bogus=1", "task.prepare.bogus"),
    ("task.prepare.split.knd=random", "task.prepare.split.knd"),
    ("dataset.bogus=1", "dataset.bogus"),
    ("dataset.split.seed=1", "dataset.split"),
])
def test_unknown_key_is_rejected_naming_it(override, key):
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        _compose([override])


@pytest.mark.parametrize("override, values", [
    ("task.kind=implict", "rating, implicit, ctr, next_item"),
    ("task.next_item.loss=softmax", "full, sampled"),
    ("task.sampler=pop", "uniform, popularity"),
    ("task.loss=mse", "bce, bpr"),
    ("optimizer.name=adamw", "sgd, adagrad, lazy_adam, adam, ials, bpmf"),
    ("optimizer.dense_name=lazy_adam", "adam, adamw, sgd, adagrad"),
    ("optimizer.schedule=step", "constant, linear, cosine"),
    ("model=embed_mlp model.combiner=dott", "dot, gmf, mlp, both, linear"),
    ("model=embed_mlp model.reg_per=row", "positive, pair"),
    ("task.prepare.split.kind=randm", "random, random_global, temporal, leave_last_out, given"),
    ("task.prepare.split.tie_break=newest", "first, last"),
    ("task.prepare.dedup=first", "last, aggregate, none"),
    ("task.prepare.on_bad_rows=ignore", "error, skip"),
    ("task.prepare.negatives.sampler=pop", "uniform, popularity"),
    ("task.prepare.compression=lzma", "lz4, zstd, snappy, gzip, brotli, none"),
    ("dataset=zozotown-obd dataset.campaign=kids", "all, men, women"),
])
def test_bad_enum_value_is_rejected_naming_key_and_choices(override, values):
    with pytest.raises(ConfigCompositionException) as e:
        _compose(override.split())
    key, value = override.split()[-1].split("=")
    assert key in str(e.value)
    assert f"Invalid value '{value}', expected one of [{values}]" in str(e.value.__cause__)
