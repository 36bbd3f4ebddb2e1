"""One typed configuration for a run, loaded from YAML with CLI overrides.

Every knob lives in a dataclass below; a YAML file may set any subset of them.
An unknown key or a value of the wrong type is a `ConfigError` that names the
key and the file, raised before any process group or data is touched.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.contract import MODALITIES, DataConfig
from data_pipeline.missing import MISSING_MODES


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


@dataclass
class TowerConfig:
    name: str = ""  # a registered tower (pretrain.registry)
    width: int = 64
    depth: int = 2
    heads: int = 4  # attention heads, for transformer towers
    options: dict[str, Any] = field(default_factory=dict)  # extra kwargs for plug-in towers
    freeze: bool = False  # keep the tower's weights fixed (its projection head still trains)
    lr_mult: float = 1.0  # the tower's learning rate = train.lr * lr_mult


@dataclass
class ModelConfig:
    embed_dim: int = 64
    image: TowerConfig = field(default_factory=lambda: TowerConfig(name="cnn", width=64, depth=3))
    text: TowerConfig = field(default_factory=lambda: TowerConfig(name="transformer", width=64, depth=2))
    audio: TowerConfig = field(default_factory=lambda: TowerConfig(name="conv1d", width=64, depth=3))
    logit_scale_init: float = 1.0 / 0.07
    logit_scale_max: float = 100.0
    logit_scale_learnable: bool = True  # false: the temperature stays at logit_scale_init
    # Run every tower on every row of the batch, absent rows included (their outputs are
    # dropped): fixed shapes and no host sync (GPU presets). False runs a tower only on the
    # rows that have its modality, which saves their compute (CPU presets) but picks the
    # rows with `nonzero`, a host sync on a GPU. Towers with batch statistics (BatchNorm in
    # train mode) would see the absent rows' placeholder inputs.
    dense_encode: bool = False
    # Compute each frozen tower's outputs once per sample of the training split (before the
    # first step, shared by the ranks, cached on disk by content) and train the heads on them:
    # the loader then never decodes those modalities (pretrain/feature_cache.py).
    cache_frozen: bool = False


@dataclass
class LossConfig:
    objective: str = "pairwise"  # pairwise | gram | pmrl
    imputed_pair_weight: float = 1.0  # pairwise: weight of a pair with one imputed side
    gram_anchor: str = "text"  # gram: the anchor modality
    gram_label_smoothing: float = 0.0  # gram: label smoothing of both cross-entropies (reference: 0.1)
    gram_negatives_grad: bool = True  # gram: gather columns with gradient (reference: without)
    pmrl_tau1: float = 0.1  # pmrl: temperature of the singular-value term
    pmrl_tau2: float = 0.0  # pmrl: fixed leading-vector temperature; 0: the learnable logit scale (reference: 0.1)
    pmrl_sign_fix: bool = True  # pmrl: sign u against its columns' mean (reference: no fix)
    # gram/pmrl: loss = joint_weight * joint term on the completed tuples
    #                 + pairwise_weight * pairwise InfoNCE on the observed pairs
    joint_weight: float = 1.0
    pairwise_weight: float = 0.0
    # Compute each objective's logits this many gathered columns at a time, recomputed in
    # backward (pretrain/chunked_ce.py): memory per rank O(local rows x chunk) instead of
    # O(local rows x global batch), GRAM's volumes included; 0 builds them whole (fastest
    # while they fit). The GPU preset sets it (docs/scaling.md).
    column_chunk: int = 0


METHODS = ("calmrl", "observed_only", "drop_incomplete", "mean_fill")


@dataclass
class CalibrationConfig:
    """How missing modalities are handled (docs/method.md, "Bi-step training").

    method: calmrl (impute with the calibrator), observed_only (align what is
    present: local anchors), drop_incomplete (only complete tuples align),
    mean_fill (missing vectors = running mean of the modality). The oracle of
    the benchmark is observed_only on data without missing modalities.
    """

    method: str = "calmrl"
    latent_dim: int = 16
    decay: float = 0.99  # running statistics: old sums are multiplied by this each step
    update_every: int = 1  # M-step every N optimizer steps
    warmup_steps: int = 10  # observed-only alignment while the calibrator is fitted
    grad_through_imputation: bool = True  # gradient from imputed vectors into observed encoders
    # Impute only rows that hold at least this many modalities (1: every row). With 2 a row
    # holding one modality (e.g. text only) is not completed from itself: it stays local.
    impute_min_observed: int = 1
    normalize_imputed: bool = True
    sigma2_floor: float = 1.0e-4
    init_scale: float = 0.1
    dtype: str = "float32"  # calibrator state and arithmetic: float32 | float64
    # Exact fits: EM to convergence on the detached features of the last `exact_fit_batches`
    # micro-batches, at the end of warm-up and then every `refit_every` steps (0: once).
    exact_fit: bool = False
    exact_fit_batches: int = 16
    exact_fit_iters: int = 1000
    exact_fit_tol: float = 1.0e-7  # relative change of the mean log-likelihood that ends EM
    refit_every: int = 0


@dataclass
class MetricsConfig:
    """Prometheus endpoint on every rank, at port + local rank."""

    enabled: bool = False
    port: int = 9400  # 0 picks a free port (tests)
    addr: str = "0.0.0.0"


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 100  # optimizer steps
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    zero_stage: int = 1
    # Extra DeepSpeed `zero_optimization` settings, passed through as given
    # (e.g. overlap_comm, contiguous_gradients, reduce_bucket_size).
    zero_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # older step folders are removed (0 keeps all)
    stop_at: int = 0  # stop (after a checkpoint) at this step; 0 runs to `steps`. Schedules still span `steps`.
    # Continued training (pretrain/init_from.py): start from another run's weights, fresh optimizer and data.
    init_from: str = ""  # RUN_DIR or RUN_DIR:TAG
    init_keys: list[str] = field(default_factory=list)  # glob patterns of the weights to load; [] = all, strictly
    init_calibrator: bool = False  # also take the source run's completion state
    # Faults (pretrain/guard.py, docs/faults.md). A step whose loss or gradient is not
    # finite on any rank (or, with loss_spike_factor > 0, whose global loss exceeds that
    # factor times its running mean) is skipped on every rank; this many skipped steps in
    # a row stop the run with the last good checkpoint named (0: never stop).
    max_bad_steps: int = 10
    loss_spike_factor: float = 0.0  # 0: off
    loss_spike_warmup: int = 20  # good steps before the spike test applies
    collective_timeout_s: float = 600.0  # a collective that waits longer ends the job (dead or stalled peer)
    preempt_grace_s: int = 120  # after SIGTERM/SIGUSR1: time for the step and the save before SIGKILL


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, source: str = "<config>") -> None:
        """Checks that need more than a type: ranges and choices."""
        t = self.train
        checks = [
            (t.zero_stage in (0, 1, 2, 3), "train.zero_stage", "must be 0, 1, 2 or 3"),
            (t.precision in ("fp32", "bf16"), "train.precision", "must be 'fp32' or 'bf16'"),
            (t.steps > 0, "train.steps", "must be positive"),
            (t.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
            (len(t.betas) == 2, "train.betas", "must hold two numbers"),
            (t.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0 (0: never stop)"),
            (t.loss_spike_factor == 0 or t.loss_spike_factor > 1, "train.loss_spike_factor", "must be 0 (off) or > 1"),
            (t.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive"),
            (t.preempt_grace_s > 0, "train.preempt_grace_s", "must be positive"),
            (0 <= t.warmup_steps <= t.steps, "train.warmup_steps", "must lie in [0, train.steps]"),
            (
                not self.model.cache_frozen or any(getattr(self.model, m).freeze for m in MODALITIES),
                "model.cache_frozen",
                "needs a frozen tower (model.<modality>.freeze: true)",
            ),
            (self.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
            (self.data.num_workers >= 0, "data.num_workers", "must be >= 0"),
            (0.0 <= self.data.extra_missing <= 1.0, "data.extra_missing", "must lie in [0, 1]"),
            (
                self.data.extra_missing_mode in MISSING_MODES,
                "data.extra_missing_mode",
                f"must be one of: {', '.join(MISSING_MODES)}",
            ),
            (
                self.loss.objective in ("pairwise", "gram", "pmrl"),
                "loss.objective",
                "must be one of: pairwise, gram, pmrl",
            ),
            (0.0 <= self.loss.gram_label_smoothing < 1.0, "loss.gram_label_smoothing", "must lie in [0, 1)"),
            (self.loss.pmrl_tau1 > 0, "loss.pmrl_tau1", "must be positive"),
            (self.loss.pmrl_tau2 >= 0, "loss.pmrl_tau2", "must be >= 0 (0: the learnable logit scale)"),
            (
                self.loss.joint_weight >= 0 and self.loss.pairwise_weight >= 0,
                "loss.pairwise_weight",
                "and loss.joint_weight must be >= 0",
            ),
            (self.loss.gram_anchor in MODALITIES, "loss.gram_anchor", f"must be one of: {', '.join(MODALITIES)}"),
            (self.calibration.method in METHODS, "calibration.method", f"must be one of: {', '.join(METHODS)}"),
            (self.calibration.latent_dim >= 1, "calibration.latent_dim", "must be >= 1"),
            (0.0 < self.calibration.decay <= 1.0, "calibration.decay", "must lie in (0, 1]"),
            (self.calibration.update_every >= 1, "calibration.update_every", "must be >= 1"),
            (self.calibration.impute_min_observed >= 1, "calibration.impute_min_observed", "must be >= 1"),
            (self.calibration.exact_fit_batches >= 1, "calibration.exact_fit_batches", "must be >= 1"),
            (self.calibration.exact_fit_iters >= 1, "calibration.exact_fit_iters", "must be >= 1"),
            (self.calibration.refit_every >= 0, "calibration.refit_every", "must be >= 0"),
            (self.calibration.dtype in ("float32", "float64"), "calibration.dtype", "must be float32 or float64"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"{source}: '{key}' {why} (got {_get(self, key)!r})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` as type `tp`, or raise a ConfigError naming key and file."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{key}' has the wrong type: {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{source}: '{key}' must be null")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _looks_like_float(value):
        return float(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{source}: unknown key '{full}'; valid keys here: {', '.join(sorted(names))}")
    obj = cls()
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type) and isinstance(value, dict):
            # Merge into the default so a file can set one field of a nested block.
            merged = {**dataclasses.asdict(current), **value}
            setattr(obj, key, _build(type(current), merged, full, source))
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))
    return obj


def build_section(cls: type, values: dict[str, Any], source: str) -> Any:
    """A typed dataclass (any config-like schema, e.g. a sweep file's) from a mapping,
    with the same checks as a config: unknown keys and wrong types name key and file."""
    return _build(cls, values, "", source)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': 1} -> {'a': {'b': 1}}."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        _set_dotted(tree, dotted, value)
    return tree


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--train.lr=3e-4` style overrides into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for arg in args:
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body:
            raise ConfigError(f"override '{arg}' must look like --section.key=value")
        key, raw = body.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str) and _looks_like_float(raw):
            value = float(raw)  # YAML 1.1 reads '3e-4' as a string; users mean a float
        _set_dotted(tree, key, value)
    return tree


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into a copy of `base`, section by section."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> Config:
    """Load a YAML preset, apply `--a.b=value` overrides, check types and ranges.

    `base` (a partial config tree) sits under the file: the file's keys win over
    it, the overrides over both."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    if base:
        tree = deep_merge(base, tree)
    cfg = _build(Config, tree, "", source)
    if overrides:
        over_source = f"{source} (command-line overrides)"
        cfg = _build(Config, deep_merge(cfg.to_dict(), parse_overrides(overrides)), "", over_source)
    cfg.validate(source)
    return cfg


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = _build(Config, tree, "", source)
    cfg.validate(source)
    return cfg
