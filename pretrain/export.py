"""`calmrl export`: a run's checkpoint as one folder that loads without DeepSpeed or the run.

    EXPORT/model.safetensors       the towers, heads and logit scale (fp32, or bf16 on request)
    EXPORT/completion.safetensors  the completion state (the CalMRL calibrator's W, mu, sigma2 and
                                   statistics, or mean-fill's running means); absent for methods
                                   without one
    EXPORT/config.yaml             the run's resolved config (the model and data sections decide
                                   how inputs are decoded and what is built)
    EXPORT/tokenizer.json          the text tower's tokenizer
    EXPORT/export.json             what it is: format, source run and checkpoint, dtype, vocabulary
                                   size, completion method and the SHA-256 of every file above

The folder is written beside its destination under a temporary name and renamed into
place whole; an existing export at the destination is replaced only once the new one is
complete. `pretrain.encoder.Encoder.load` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from data_pipeline.contract import MODALITIES
from data_pipeline.split import open_split
from data_pipeline.tokenizer import load_tokenizer
from pretrain.checkpoint import LATEST
from pretrain.completion import Completion
from pretrain.config import Config, config_from_dict
from pretrain.model import MultiModalModel
from pretrain.run_dir import RunDir

FORMAT = 1
MANIFEST = "export.json"
MODEL_FILE = "model.safetensors"
COMPLETION_FILE = "completion.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """A folder that is not a (complete, intact) export, or an export that cannot be written."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """safetensors holds tensors only, each with its own storage (no shared views)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def export_run(run_dir: str | Path, out: str | Path, tag: str = LATEST, dtype: str = "fp32") -> Path:
    """Write the export of `run_dir`'s checkpoint `tag` to `out`; returns `out`."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    run = RunDir(run_dir)
    cfg, model, tag = run.load_model(tag)
    completion = run.load_completion(tag)
    tokenizer_json = open_split(cfg.data.shards, cfg.data.tokenizer).tokenizer_json
    vocab = int(load_tokenizer(tokenizer_json, cfg.data.max_text_len).get_vocab_size())
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not a calmrl export; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        save_file(_tensors(weights), str(staging / MODEL_FILE))
        completion_state = _tensors(completion.state_dict())
        if completion_state:
            save_file(completion_state, str(staging / COMPLETION_FILE))
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (staging / TOKENIZER_FILE).write_text(tokenizer_json)
        step = int(tag.rsplit("_", 1)[-1]) if tag.startswith("step_") else None
        manifest = {
            "format": FORMAT,
            "kind": "calmrl-export",
            "run": str(run.path.resolve()),
            "checkpoint": tag,
            "step": step,
            "dtype": dtype,
            "modalities": list(MODALITIES),
            "embed_dim": cfg.model.embed_dim,
            "vocab_size": vocab,
            "completion": cfg.calibration.method,
            # non-tensor state (the calibrator's modality order and sizes, which guard its load)
            "completion_extra": {k: v for k, v in completion.state_dict().items() if not isinstance(v, torch.Tensor)},
            "files": {p.name: _sha256(p) for p in sorted(staging.iterdir())},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it private; an export is shared like any output
        for path in staging.iterdir():
            path.chmod(0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out.exists():  # replace the old export only now that the new one is whole
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_manifest(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """An export's manifest; `verify` checks every file's SHA-256 against it."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(
            f"{folder} is not a calmrl export (no {MANIFEST}); write one with `calmrl export RUN --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); export the run again") from exc
    if manifest.get("kind") != "calmrl-export" or manifest.get("format") != FORMAT:
        raise ExportError(
            f"{path}: export format {manifest.get('format')!r} of kind {manifest.get('kind')!r}; "
            f"this calmrl reads format {FORMAT}: export the run again"
        )
    if verify:
        for name, digest in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise ExportError(f"{file} is missing from the export; export the run again")
            if _sha256(file) != digest:
                raise ExportError(f"{file} does not match its SHA-256 in {MANIFEST}: damaged; export the run again")
    return manifest


def load_export(folder: str | Path) -> tuple[Config, MultiModalModel, Completion, str, dict[str, Any]]:
    """(config, model in eval mode with the export's weights, completion state, tokenizer JSON, manifest)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    cfg = config_from_dict(yaml.safe_load((folder / CONFIG_FILE).read_text()), str(folder / CONFIG_FILE))
    model = MultiModalModel(cfg.model, cfg.data, int(manifest["vocab_size"]))
    state = load_file(str(folder / MODEL_FILE))
    missing, unexpected = model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    if missing or unexpected:
        raise ExportError(
            f"{folder / MODEL_FILE} does not match the model its config describes: missing {missing}, unexpected {unexpected}"
        )
    completion = Completion(cfg.calibration, MODALITIES, cfg.model.embed_dim, seed=cfg.train.seed)
    if (folder / COMPLETION_FILE).is_file():
        saved = load_file(str(folder / COMPLETION_FILE))
        completion.load_state_dict({**saved, **manifest.get("completion_extra", {})})
    tokenizer_json = (folder / TOKENIZER_FILE).read_text()
    return cfg, model.eval(), completion, tokenizer_json, manifest
