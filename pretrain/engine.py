"""The DeepSpeed engine of a run: its config, the optimizer's parameter groups, initialisation.

ZeRO stage, precision, gradient accumulation and clipping, and the warm-up +
cosine schedule all come from `train.*`; the optimizer is a torch AdamW
passed in (no compiled optimizer op needed on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pretrain.config import Config
from pretrain.guard import SkippableAdamW
from pretrain.model import MultiModalModel


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {**t.zero_options, "stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": max(t.warmup_steps, 1),
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def build_optimizer(model: MultiModalModel, cfg: Config) -> torch.optim.Optimizer:
    """`SkippableAdamW` (torch's AdamW) with one group per (tower or rest) x (decay or not).

    No weight decay on biases, norms, position tables and the logit scale; a
    tower's `lr_mult` scales its groups' learning rate (the schedule scales
    every group alike); a frozen tower's weights, and any parameter the model
    made fixed, are left out entirely."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # fixed by the config (e.g. model.logit_scale_learnable: false)
            continue
        mult = 1.0
        if name.startswith("towers."):
            tower = getattr(cfg.model, name.split(".")[1])
            if tower.freeze:
                p.requires_grad_(False)
                continue
            mult = tower.lr_mult
        decay = p.ndim >= 2 and "position" not in name
        groups.setdefault((mult, decay), []).append(p)
    param_groups = [
        {"params": params, "lr": cfg.train.lr * mult, "weight_decay": cfg.train.weight_decay if decay else 0.0}
        for (mult, decay), params in groups.items()
    ]
    # AdamW that the step guard can tell to leave a bad step out (pretrain/guard.py)
    return SkippableAdamW(param_groups, lr=cfg.train.lr, betas=(cfg.train.betas[0], cfg.train.betas[1]))


def build_engine(model: MultiModalModel, cfg: Config, world: int) -> Any:
    """`deepspeed.initialize` over the model with its AdamW; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg), config=deepspeed_config(cfg, world)
    )
    return engine


@contextmanager
def loading_universal_checkpoint(engine: Any) -> Iterator[None]:
    """Make `engine.load_checkpoint` read a universal checkpoint (`ds_to_universal` output) inside
    this block: what the config's `"checkpoint": {"load_universal": true}` does, for one load.

    DeepSpeed 0.19 reads that setting only inside `load_checkpoint` (engine.py,
    `load_universal_checkpoint()`); nothing at `initialize` depends on it. Set in the
    config it would make every load expect universal folders, yet whether one is needed
    (the world size changed) is only known at resume time."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
