"""The hyperparameters of a DISCA run (:class:`EMConfig`), apart from the loop in
:mod:`disca_tools.cluster.em` so that the CLI can take its defaults without importing Keras.
The defaults and why they differ from the reference code are in :mod:`disca_tools.cluster.em`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..runtime.errors import UserError
from ..runtime.log import logger

if TYPE_CHECKING:
    from ..model.yopo import YopoConfig


# --init-covariance (cluster.mixture.select_initial_mixture): full, diagonal, or chosen by BIC
INIT_COVARIANCES = ("full", "diag", "auto")

# The options that are not in the paper (README 'Clustering accuracy'). Their defaults are the
# paper's choices: EMConfig() is the paper's method, and :meth:`EMConfig.paper_choices` resets them.
BEYOND_PAPER = (
    "init",
    "init_epochs",
    "init_covariance",
    "init_pca_dim",
    "train_clusters",
    "calibrate_bn",
    "input_dropout",
    "pca_trained_classes",
    "predict_rotations",
    "projection",
    "init_refine",
)

# Options that act only on the clusters of the data at iteration 0 (init "invariants"/"voxels"),
# with the flag that sets them
INIT_DATA_ONLY = {
    "init_covariance": "--init-covariance",
    "init_pca_dim": "--init-pca-dim",
    "init_refine": "--init-refine",
}

# --projection: what the mixtures see of a trained network's features (cluster.discriminant)
PROJECTIONS = ("pca", "lda")
# --init-refine: iteration 0's clusters of the data as chosen, or refined by LDA-k-means
INIT_REFINES = ("none", "lda")


@dataclass
class EMConfig:
    """Hyperparameters of a DISCA run (the defaults, and why they differ from the reference code:
    :mod:`disca_tools.cluster.em`)."""

    k_candidates: list[int] = field(default_factory=lambda: list(range(2, 21)))
    pca_dim: int = 16
    max_iter: int = 20
    epochs_per_iter: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.95
    label_smoothing: float = 0.2
    smoothing_decay: float = 0.9
    width_scale: float = 1.0
    feature_dim: int = 1024
    precision: str = "float32"
    seed: int = 0
    patience: int = 3
    stable_fraction: float = 0.99
    predict_batch_size: int = 64
    augment: bool = True
    head_c: float = 1.0
    head_max_iter: int = 300
    init: str = "network"  # iteration-0 clusters: "network" (the paper), "invariants", "voxels"
    train_clusters: int = 0  # > K: train on this many nested sub-clusters (0: on the K clusters)
    # epochs of the first round when the iteration-0 clusters come from the data, not the network
    # (init "invariants" or "voxels"): the random network must learn them before it is re-clustered
    init_epochs: int = 0  # 0: epochs_per_iter
    calibrate_bn: bool = False  # BatchNorm statistics from the clean data before each feature pass
    calibrate_samples: int = 512
    mixture_jobs: int = 1  # processes fitting the candidate K (the result does not depend on it)
    input_dropout: float = 0.5  # YOPO's input GaussianDropout rate while training (the paper's 0.5)
    # PCA of a trained network's features in at most (classes it was last trained on − 1) dimensions
    pca_trained_classes: bool = False
    # iteration-0 mixtures when the clusters come from the data (init "invariants"/"voxels"): "full"
    # covariances with the paper's BIC, as in every later iteration, "diag" with scikit-learn's, or
    # "auto": the one of the two with the lower scikit-learn BIC
    init_covariance: str = "full"
    # PCA dimension of iteration 0's clusters of the data (init "invariants"/"voxels"); 0: pca_dim
    init_pca_dim: int = 0
    # features: the mean over each subtomogram and this many − 1 rotated copies (1: the paper's one)
    predict_rotations: int = 1
    # the mixtures' points from iteration 1 on: the PCA of the features (the paper's "pca"), or
    # their projection on the previous clusters' discriminant directions ("lda")
    projection: str = "pca"
    # iteration 0's clusters of the data (init "invariants"/"voxels"): as the mixtures chose them
    # ("none"), or refined at their K by LDA-k-means on the descriptors ("lda")
    init_refine: str = "none"

    def check(self, n: int, box: int) -> None:
        """Raise a UserError for settings that cannot work with ``n`` particles of ``box``³
        (errors only: :meth:`warn_skipped_k` logs what the run will skip)."""
        from ..model import MIN_BOX

        if box < MIN_BOX:
            raise UserError(f"subtomograms: box {box} is too small; YOPO needs at least {MIN_BOX}³")
        if not self.k_candidates or min(self.k_candidates) < 2:
            raise UserError(f"--k-candidates: need values ≥ 2, got {self.k_candidates}")
        if self.max_iter < 1:
            raise UserError("--max-iter: must be at least 1 (iteration 0 is the untrained network)")
        p = self.pca_components
        if self.init != "network":
            p = max(p, self.init_pca_components)
        need = min(self.k_candidates) * (p + 1)
        if n < need:
            raise UserError(
                f"particles: {n} particles are too few for candidate K {min(self.k_candidates)}–"
                f"{max(self.k_candidates)} at PCA dimension {p} (need ≥ {need}; lower --pca-dim or K)"
            )
        if self.init_epochs < 0:
            raise UserError(f"--init-epochs: must be ≥ 0, got {self.init_epochs}")
        if self.mixture_jobs < 1:
            raise UserError(f"--j: must be at least 1, got {self.mixture_jobs}")
        if not 0.0 <= self.input_dropout < 1.0:
            raise UserError(f"--input-dropout: must be in [0, 1), got {self.input_dropout}")
        for flag, value, allowed in (
            ("--init-covariance", self.init_covariance, INIT_COVARIANCES),
            ("--projection", self.projection, PROJECTIONS),
            ("--init-refine", self.init_refine, INIT_REFINES),
        ):
            if value not in allowed:
                raise UserError(f"{flag}: must be one of {', '.join(allowed)}, got {value!r}")
        if self.init_pca_dim < 0:
            raise UserError(f"--init-pca-dim: must be ≥ 0 (0: --pca-dim), got {self.init_pca_dim}")
        if self.projection != "pca" and self.pca_trained_classes:
            raise UserError(
                "--pca-trained-classes: applies only to --projection pca (the PCA's dimension)"
            )
        if self.init == "network":
            for name, flag in INIT_DATA_ONLY.items():
                value = getattr(self, name)
                if value != getattr(EMConfig, name):
                    raise UserError(
                        f"{flag} {value}: applies only to the clusters of --init invariants or "
                        "voxels, not to those of the untrained network"
                    )
        if self.predict_rotations < 1:
            raise UserError(
                f"--predict-rotations: must be at least 1, got {self.predict_rotations}"
            )
        if self.train_clusters < 0:
            raise UserError(f"--train-clusters: must be ≥ 0, got {self.train_clusters}")

    @classmethod
    def from_options(cls, options: Any, **overrides: Any) -> EMConfig:
        """The configuration from the attributes of ``options`` (a tool's options dataclass or an
        argparse namespace) named like its fields, then ``overrides``; absent or None: the default."""
        values = {}
        for f in fields(cls):
            value = getattr(options, f.name, None)
            if value is not None:
                values[f.name] = value
        values.update(overrides)
        return cls(**values)

    @classmethod
    def paper_choices(cls) -> dict[str, Any]:
        """The paper's value of every option beyond it (:data:`BEYOND_PAPER`), and its PCA 16."""
        defaults = cls()
        return {name: getattr(defaults, name) for name in (*BEYOND_PAPER, "pca_dim")}

    def warn_skipped_k(self, n: int) -> None:
        """Log that candidate K too large for ``n`` particles will be skipped (run once per run)."""
        p = self.pca_components
        if n < max(self.k_candidates) * (p + 1):
            logger.warning(
                "Only %d particles: candidate K above %d will be skipped", n, n // (p + 1)
            )

    def mixture_pca_dim(self, k_trained: int) -> int:
        """PCA dimension of the network's features after a round trained on ``k_trained`` classes
        (0: not trained in this run): ``pca_dim``, or with ``pca_trained_classes`` at most
        ``k_trained − 1`` (at least 2): a network trained on M classes separates them in M − 1
        directions, and further components only add to the BIC's penalty."""
        if self.pca_trained_classes and k_trained > 0:
            return max(2, min(self.pca_dim, k_trained - 1))
        return self.pca_dim

    @property
    def init_pca_components(self) -> int:
        """PCA dimension of iteration 0's clusters of the data (``--init invariants``/``voxels``)."""
        return self.init_pca_dim or self.pca_dim

    @property
    def pca_components(self) -> int:
        """Dimensions the mixtures are fitted in: ``pca_dim``, at most the feature length."""
        return min(self.pca_dim, self.feature_dim)

    @property
    def head_units(self) -> int:
        """Units of the classification head: the most classes any iteration can train on."""
        return max(max(self.k_candidates), int(self.train_clusters))

    def yopo(self, box: int, k: int) -> YopoConfig:
        """The network of this run for ``box``³ subtomograms and a head of ``k`` units."""
        from ..model.yopo import YopoConfig

        return YopoConfig(
            box, k, self.width_scale, self.feature_dim, self.precision, self.input_dropout
        )
