"""Continued training: start a run from another run's weights (`train.init_from`).

`train.init_from: RUN_DIR[:TAG]` loads full fp32 model weights from a
checkpoint of any ZeRO stage (TAG defaults to `latest`) into the new model
before DeepSpeed partitions it; the optimizer, schedule and data position start
fresh. `train.init_keys` (glob patterns such as `heads.*`) limits the load to
the matching weights, for a model whose towers differ from the source's;
every selected weight must exist in the source with the same shape, and with
no patterns every weight of the model and of the source must match: a weight
that does not is an error naming it, never a silent partial load.
`train.init_calibrator` also takes the source's completion state (the
calibrator's parameters and running statistics).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from pretrain.completion import Completion
from pretrain.config import ConfigError, TrainConfig
from pretrain.run_dir import RunDir


def parse_init_from(spec: str) -> tuple[RunDir, str]:
    """'RUN_DIR' or 'RUN_DIR:TAG' -> (the run folder, the checkpoint tag)."""
    path, sep, tag = spec.rpartition(":")
    if not sep or "/" in tag or not tag:  # no tag (a ':' in a path is not one)
        path, tag = spec, "latest"
    run = RunDir(path)
    if not run.config_path.is_file():
        raise ConfigError(f"train.init_from: {path} is not a calmrl run folder (no {RunDir.CONFIG})")
    return run, tag


def load_initial_weights(model: torch.nn.Module, train: TrainConfig) -> list[str]:
    """Copy the source run's weights into `model`; returns the names loaded."""
    run, tag = parse_init_from(train.init_from)
    tag, source = run.model_state(tag)
    where = f"{run.checkpoints / tag}"
    own = model.state_dict()
    if train.init_keys:
        unmatched = [p for p in train.init_keys if not any(fnmatchcase(k, p) for k in own)]
        if unmatched:
            raise ConfigError(
                f"train.init_keys: {', '.join(unmatched)} select no weight of the model "
                f"(its weights look like {next(iter(own))})"
            )
        selected = [k for k in own if any(fnmatchcase(k, p) for p in train.init_keys)]
    else:
        selected = list(own)
        extra = sorted(set(source) - set(own))
        if extra:
            raise ConfigError(
                f"train.init_from: {where} holds weights this model lacks: {', '.join(extra[:5])}"
                f"{' ...' if len(extra) > 5 else ''}; set train.init_keys to load a subset"
            )
    for key in selected:
        if key not in source:
            raise ConfigError(
                f"train.init_from: weight {key} is not in {where}; set train.init_keys to the "
                "weights the two models share"
            )
        if source[key].shape != own[key].shape:
            raise ConfigError(
                f"train.init_from: weight {key} has shape {tuple(source[key].shape)} in {where}, "
                f"{tuple(own[key].shape)} in this model"
            )
    with torch.no_grad():
        for key in selected:
            own[key].copy_(source[key].to(own[key].dtype))
    return selected


def load_initial_completion(completion: Completion, train: TrainConfig) -> None:
    """The source run's completion state (calibrator or mean filler) at the same checkpoint."""
    run, tag = parse_init_from(train.init_from)
    state = run.rank_state(tag)["completion"]
    try:
        completion.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"train.init_calibrator: the completion state of {run.path} ({tag}) does not fit this "
            f"run's calibration settings: {exc}"
        ) from None
