"""Modality encoders ("towers") and the registry that builds them by name.

A tower maps its modality's batch tensors to features [N, width]; the model
adds a projection head to the shared embedding size. To plug in another
encoder, register a builder:

    @register_tower("image", "my_vit")
    def build_my_vit(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower: ...

and set `model.image.name: my_vit` in the config.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pretrain.config import DataConfig, TowerConfig

Builder = Callable[[TowerConfig, DataConfig, int], "Tower"]
TOWERS: dict[tuple[str, str], Builder] = {}


class Tower(nn.Module):
    """Base class: `forward(inputs: dict[str, Tensor]) -> [N, out_dim]`."""

    modality: str = ""
    out_dim: int = 0


def register_tower(modality: str, name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        TOWERS[(modality, name)] = builder
        return builder

    return wrap


def build_tower(modality: str, cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
    builder = TOWERS.get((modality, cfg.name))
    if builder is None:
        known = sorted(name for (m, name) in TOWERS if m == modality)
        raise KeyError(f"no {modality} tower named '{cfg.name}'; registered: {', '.join(known)}")
    return builder(cfg, data, vocab_size)


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
            layers += [nn.Conv1d(channels, width, 3, stride=2 if i else 1, padding=1),
                       nn.GroupNorm(min(8, width), width), nn.GELU()]
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
    once by `calmrl benchmark`): LayerNorm, then `depth` GELU layers of `width`
    (depth 0: the normalised features themselves; the model's head follows)."""

    def __init__(self, modality: str, dim: int, width: int, depth: int):
        super().__init__()
        self.modality = modality
        layers: list[nn.Module] = [nn.LayerNorm(dim)]
        channels = dim
        for _ in range(depth):
            layers += [nn.Linear(channels, width), nn.GELU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.body(inputs[self.modality].float())


def _feature_builder(modality: str) -> Builder:
    def build(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower:
        dim = cfg.options.get("dim")
        unknown = set(cfg.options) - {"dim"}
        if not isinstance(dim, int) or dim < 1 or unknown:
            raise ValueError(f"{modality} tower 'features' needs options {{dim: N}} (the feature size) and "
                             f"nothing else; got {cfg.options}")
        return FeatureTower(modality, dim, cfg.width, cfg.depth)

    return build


for _modality in ("image", "text", "audio"):
    register_tower(_modality, "features")(_feature_builder(_modality))

import pretrain.pretrained  # noqa: E402,F401  (registers the pretrained towers)
