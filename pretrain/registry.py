"""The tower registry: modality encoders ("towers") registered by name.

A tower maps its modality's batch tensors to features [N, out_dim]; the
model adds a projection head to the shared embedding size. Built-in towers
register themselves in `pretrain.towers` (trained from scratch) and
`pretrain.pretrained` (loaded from local files); to plug in another encoder:

    from pretrain.registry import Tower, register_tower

    @register_tower("image", "my_vit")
    def build_my_vit(cfg: TowerConfig, data: DataConfig, vocab_size: int) -> Tower: ...

and set `model.image.name: my_vit` in the config (import your module before
the model is built). This module imports nothing of the project but the
config types, so any tower module can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from data_pipeline.contract import DataConfig
from pretrain.config import TowerConfig


class Tower(nn.Module):
    """Base class: `forward(inputs: dict[str, Tensor]) -> [N, out_dim]`."""

    modality: str = ""
    out_dim: int = 0


Builder = Callable[[TowerConfig, DataConfig, int], Tower]
TOWERS: dict[tuple[str, str], Builder] = {}


def register_tower(modality: str, name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        TOWERS[(modality, name)] = builder
        return builder

    return wrap


def lookup_tower(modality: str, name: str) -> Builder:
    builder = TOWERS.get((modality, name))
    if builder is None:
        known = sorted(n for (m, n) in TOWERS if m == modality)
        raise KeyError(f"no {modality} tower named '{name}'; registered: {', '.join(known)}")
    return builder
