"""Typed config schemas, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` extend these schemas (``defaults: [/schema/<group>/<name>@_here_]``), so
a misspelt key or a value of the wrong type (``trainer.batch_size=abc``) is rejected when
the config is composed, before any work starts, with a message naming the key and value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclasses.dataclass
class SplitConfig:
    kind: str = "random"
    test_fraction: float = 0.1
    val_fraction: float = 0.05      # carved from what remains after the test split
    seed: int = 0                   # the data split's seed (independent of the model seed)


@dataclasses.dataclass
class MovieLensConfig:
    name: str = MISSING
    path: Optional[str] = None      # directory with GroupLens ratings.dat / u.data; None = wheel
    data_dir: Optional[str] = None  # cache root; None = $JAXRECO_CACHE or ~/.cache/jaxreco
    rating_range: list[float] = dataclasses.field(default_factory=lambda: [1.0, 5.0])
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)


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
    combiner: str = "mlp"           # dot (MF) | gmf | mlp | both (NeuMF) | linear (LR)
    dim: int = 32                   # MLP-tower embedding size per feature
    mf_dim: int = 32                # dot/GMF embedding size
    mlp_dims: list[int] = dataclasses.field(default_factory=lambda: [64, 32, 16])
    bias: bool = True               # first-order terms b_u + b_i + Σ b_f
    heads: list[str] = dataclasses.field(default_factory=lambda: ["click"])  # click|purchase|rating
    init_std: float = 0.01
    reg: float = 0.0                # λ Σ‖row‖² of the embedding rows each example touches
    bias_reg: float = 0.0
    # implicit tasks: "positive" — each positive regularises its user, item and negative
    # rows once; "pair" — every scored pair (the positive and each of its k negatives)
    # regularises its user and item rows, so user-side rows count 1+k times (the per-example
    # SGD objective of Rendle et al. 2020)
    reg_per: str = "positive"
    # NeuMF pre-training from a GMF and an MLP run directory (jaxreco/train/pretrained.py)
    pretrained_gmf: Optional[str] = None
    pretrained_mlp: Optional[str] = None
    pretrained_alpha: float = 0.5
    row_multiple: int = 128


@dataclasses.dataclass
class TaskConfig:
    """What is learnt and how it is evaluated.

    ``rating``: explicit ratings, MSE, RMSE/MAE (the dataset's own random split).
    ``implicit``: every (train) interaction a positive, ``num_negatives`` sampled items per
    positive, BCE or BPR; HR/NDCG/Recall/MRR/coverage@K, sampled and full ranking.
    ``ctr``: labelled impressions (``label``), BCE; AUC, logloss, calibration.
    ``implicit`` and ``ctr`` read a prepared dataset (``jaxreco.data.prepare`` with the
    ``prepare`` options below, cached by config).
    """
    kind: str = "rating"
    prepare: dict[str, Any] = dataclasses.field(default_factory=dict)  # conf/prepare/default.yaml keys
    num_negatives: int = 4
    sampler: str = "uniform"        # uniform | popularity (∝ train count^pop_alpha)
    pop_alpha: float = 1.0
    loss: str = "bce"               # bce | bpr
    exclude_positives: bool = True  # resample sampled negatives that are train positives
    side_features: list[str] = dataclasses.field(default_factory=list)     # item_features columns
    context_features: list[str] = dataclasses.field(default_factory=list)  # interaction columns
    ks: list[int] = dataclasses.field(default_factory=lambda: [5, 10, 20])
    full_ranking: bool = True
    select: str = ""                # val metric for early stopping/best checkpoint (default:
                                    # rmse | ndcg@10 | auc); sampled protocol for implicit
    eval_chunk_elements: int = 33554432


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "lazy_adam"         # tables: sgd|adagrad|lazy_adam|adam (row-sparse) or ials
    lr: float = 0.002
    dense_name: str = "adam"        # optax optimizer of the dense parameters
    dense_lr: float = 0.001
    schedule: str = "constant"      # constant | linear | cosine: both rates decay to 0 at the last step
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
class TrainConfig:
    name: str = MISSING             # experiment name: outputs/<name>/<timestamp>
    seed: int = 0
    dataset: Any = MISSING
    model: Any = MISSING
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    logger: LoggerConfig = dataclasses.field(default_factory=LoggerConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # Group YAMLs extend these with `defaults: [/schema/<group>/<name>@_here_]`.
    cs.store(group="schema/dataset", name="movielens", node=MovieLensConfig)
    cs.store(group="schema/model", name="mf", node=MFConfig)
    cs.store(group="schema/model", name="embed_mlp", node=EmbedMLPConfig)
    cs.store(group="schema/optimizer", name="default", node=OptimizerConfig)
    cs.store(group="schema/trainer", name="default", node=TrainerConfig)
    cs.store(group="schema/mesh", name="default", node=MeshConfig)
    cs.store(group="schema/logger", name="default", node=LoggerConfig)
