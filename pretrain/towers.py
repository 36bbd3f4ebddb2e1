"""The built-in towers trained from scratch, and `build_tower`.

Small encoders for CPU runs and tests (a conv image tower, a transformer text
tower, a 1-D conv audio tower) and `features` towers over precomputed
features. The pretrained towers register in `pretrain.pretrained`, which this
module imports so that `build_tower` knows every built-in name; the registry
itself is `pretrain.registry`.
"""

from __future__ import annotations

import torch
from torch import nn

from data_pipeline.contract import DataConfig
from pretrain import pretrained
from pretrain.config import TowerConfig
from pretrain.registry import Builder, Tower, lookup_tower, register_tower

BUILTIN_MODULES = ("pretrain.towers", pretrained.__name__)


def build_tower(modality: str, cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    """The tower registered as (modality, cfg.name), built for `data`."""
    return lookup_tower(modality, cfg.name)(cfg, data, vocab_size)


class ConvImageTower(Tower):
    """Strided conv blocks with GroupNorm (no batch statistics: absent rows and
    per-rank batches must not change what a sample encodes), then mean pooling."""

    modality = "image"

    def __init__(self, width: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(depth):
            out = max(width // 2 ** (depth - 1 - i), 8)  # channels double up to `width`
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(min(8, out), out), nn.GELU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.body(inputs["image"]).mean(dim=(2, 3))


class TransformerTextTower(Tower):
    """Token embedding + learned positions + pre-norm transformer, masked mean pool."""

    modality = "text"

    def __init__(self, vocab_size: int, max_len: int, width: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = inputs["text"], inputs["text_mask"]
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        x = self.norm(x)
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class ConvAudioTower(Tower):
    """1-D convolutions over log-mel frames (mels as channels), mean over time."""

    modality = "audio"

    def __init__(self, n_mels: int, width: int, depth: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, n_mels)  # per-clip normalisation of the log-mel
        layers: list[nn.Module] = []
        channels = n_mels
        for i in range(depth):
            layers += [
                nn.Conv1d(channels, width, 3, stride=2 if i else 1, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.GELU(),
            ]
            channels = width
        self.body = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.body(self.norm(inputs["audio"])).mean(dim=2)


@register_tower("image", "cnn")
def _build_cnn(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    return ConvImageTower(cfg.width, cfg.depth)


@register_tower("text", "transformer")
def _build_text_transformer(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    return TransformerTextTower(vocab_size, data.max_text_len, cfg.width, cfg.depth, cfg.heads)


@register_tower("audio", "conv1d")
def _build_conv1d(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    return ConvAudioTower(data.n_mels, cfg.width, cfg.depth)


class FeatureTower(Tower):
    """Precomputed features [N, dim] (e.g. a frozen backbone's outputs, cached
    once by `calmrl benchmark`): LayerNorm (unless `norm` is false), then `depth`
    GELU layers of `width` (depth 0: the features themselves; the model's head
    follows). With `residual` the layers are an adapter x + MLP(x) whose last
    layer starts at zero: the tower starts as the identity, so continued
    training over a frozen backbone starts exactly where the backbone left off."""

    def __init__(self, modality: str, dim: int, width: int, depth: int, norm: bool = True, residual: bool = False):
        super().__init__()
        self.modality = modality
        self.residual = residual
        layers: list[nn.Module] = [nn.LayerNorm(dim)] if norm else []
        channels = dim
        for _ in range(depth):
            layers += [nn.Linear(channels, width), nn.GELU()]
            channels = width
        if residual and depth:
            last = nn.Linear(channels, dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            layers.append(last)
            channels = dim
        self.body = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[self.modality].float()
        return x + self.body(x) if self.residual else self.body(x)


def _feature_builder(modality: str) -> Builder:
    def build(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
        dim = cfg.options.get("dim")
        unknown = set(cfg.options) - {"dim", "norm", "residual"}
        if not isinstance(dim, int) or dim < 1 or unknown:
            raise ValueError(
                f"{modality} tower 'features' needs options {{dim: N}} (the feature size), optionally "
                f"norm (bool) and residual (bool), nothing else; got {cfg.options}"
            )
        norm, residual = cfg.options.get("norm", True), cfg.options.get("residual", False)
        if not isinstance(norm, bool) or not isinstance(residual, bool):
            raise ValueError(f"{modality} tower 'features': norm and residual must be true or false; got {cfg.options}")
        return FeatureTower(modality, dim, cfg.width, cfg.depth, norm=norm, residual=residual)

    return build


for _modality in ("image", "text", "audio"):
    register_tower(_modality, "features")(_feature_builder(_modality))
