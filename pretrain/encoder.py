"""Using a trained model: embed inputs as users have them, and complete what they lack.

    enc = Encoder.load("runs/demo")                 # a run folder, or an export (calmrl export)
    out = enc.encode(images=["cat.png", None], texts=["a cat", "a dog barking"],
                     audio=[None, "bark.ogg"], complete=True)
    out.emb["audio"]        # [2, D]: row 0 imputed by the calibrator, row 1 encoded
    out.observed, out.imputed, out.variance["audio"]

Inputs go through the training decoders (`data_pipeline.decode`, the run's tokenizer,
`collate`) and the training forward (`MultiModalModel`), so an input encodes to what the
same sample encoded to in training. An entry may be None (missing); a row with nothing
usable is an error naming it. With `complete=True` the run's calibrator imputes every
missing modality of a row that has at least one (its posterior mean W_m b + mu_m,
normalised as in training), and reports its predictive variance per dimension,
tr(W_m V_O W_m^T) / d + sigma2_m for the row's observed set O (before normalisation).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import torch
from PIL import Image

from data_pipeline.contract import MODALITIES
from data_pipeline.decode import AudioFormat, DecodeError, decode_image, decode_text, decode_waveform, fit_length
from data_pipeline.samples import collate
from data_pipeline.split import open_split
from data_pipeline.tokenizer import load_tokenizer
from pretrain.checkpoint import LATEST
from pretrain.completion import Completion
from pretrain.config import Config
from pretrain.export import MANIFEST, load_export
from pretrain.model import MultiModalModel
from pretrain.run_dir import RunDir

ImageInput = str | Path | bytes | Image.Image | None
AudioInput = str | Path | bytes | tuple[np.ndarray, int] | None


class InputError(ValueError):
    """One input cannot be used; `index` is its row."""

    def __init__(self, index: int, message: str):
        super().__init__(f"input {index}: {message}")
        self.index = index


class ModelLoadError(ValueError):
    """A path that is neither a calmrl run folder nor an export."""


@dataclass
class Encoded:
    emb: dict[str, torch.Tensor]  # modality -> [N, D] unit vectors; zeros where neither observed nor imputed
    observed: torch.Tensor  # [N, M] bool, in MODALITIES order
    imputed: torch.Tensor  # [N, M] bool (complete=True only)
    variance: dict[str, torch.Tensor]  # modality -> [N] predictive variance per dimension; 0 where observed

    def __len__(self) -> int:
        return int(self.observed.shape[0])


def _read(source: str | Path, what: str) -> bytes:
    path = Path(source)
    if not path.is_file():
        raise DecodeError(f"{what} file {path} not found")
    return path.read_bytes()


class Encoder:
    """A trained model with its decoders and completion state, for inference (no DeepSpeed)."""

    def __init__(
        self,
        cfg: Config,
        model: MultiModalModel,
        completion: Completion,
        tokenizer_json: str,
        source: str,
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.completion = completion.to(self.device)
        self.tokenizer_json = tokenizer_json
        self.tokenizer = load_tokenizer(tokenizer_json, cfg.data.max_text_len)
        d = cfg.data
        self.audio_format = AudioFormat(d.sample_rate, d.audio_seconds, d.n_mels, d.n_fft, d.hop_length)
        self.source = source

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", checkpoint: str = LATEST) -> Encoder:
        """An export folder (export.json) or a run folder (config.yaml; `checkpoint` names the tag)."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such model; give a run folder (runs/NAME) or an export (calmrl export)")
        if (path / MANIFEST).is_file():
            cfg, model, completion, tokenizer_json, _ = load_export(path)
            return cls(cfg, model, completion, tokenizer_json, str(path), device)
        if (path / RunDir.CONFIG).is_file():
            run = RunDir(path)
            cfg, model, tag = run.load_model(checkpoint)
            completion = run.load_completion(tag)
            tokenizer_json = open_split(cfg.data.shards, cfg.data.tokenizer).tokenizer_json
            return cls(cfg, model, completion, tokenizer_json, f"{path}:{tag}", device)
        raise ModelLoadError(
            f"{path} is neither a calmrl run folder (no {RunDir.CONFIG}) nor an export (no {MANIFEST}); "
            "give the folder `calmrl train` wrote (train.out_dir) or one `calmrl export` wrote"
        )

    @property
    def dim(self) -> int:
        return int(self.cfg.model.embed_dim)

    @property
    def has_calibrator(self) -> bool:
        return self.completion.calibrator is not None

    # -- decoding ------------------------------------------------------------
    def _image(self, value: ImageInput) -> torch.Tensor:
        if isinstance(value, Image.Image):  # through the same bytes path as training's decoder
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            data = buffer.getvalue()
        elif isinstance(value, bytes):
            data = value
        else:
            data = _read(value, "image")  # type: ignore[arg-type]
        return decode_image(data, self.cfg.data.image_size)

    def _audio(self, value: AudioInput) -> np.ndarray:
        if isinstance(value, tuple):
            wave, rate = value
            wave = np.asarray(wave, dtype=np.float32)
            if wave.ndim == 2:  # [samples, channels] as soundfile gives it
                wave = wave.mean(axis=1)
            if wave.ndim != 1 or wave.size == 0:
                raise DecodeError(
                    f"waveform of shape {tuple(np.shape(value[0]))}: give [samples] or [samples, channels]"
                )
            if rate != self.audio_format.sample_rate:
                wave = librosa.resample(wave, orig_sr=rate, target_sr=self.audio_format.sample_rate)
            return fit_length(wave.astype(np.float32, copy=False), self.audio_format)
        data = value if isinstance(value, bytes) else _read(value, "audio")  # type: ignore[arg-type]
        return decode_waveform(data, self.audio_format)

    def decode(self, index: int, image: ImageInput, text: str | None, audio: AudioInput) -> dict[str, Any]:
        """One input row as the training decoder's sample dict (raises InputError)."""
        sample: dict[str, Any] = {"key": str(index), "label": -1}
        try:
            if image is not None:
                sample["image"] = self._image(image)
            if text is not None:
                enc = self.tokenizer.encode(decode_text(text.encode("utf-8")))
                sample["text"], sample["text_mask"] = enc.ids, enc.attention_mask
            if audio is not None:
                sample["audio"] = self._audio(audio)
        except DecodeError as exc:
            raise InputError(index, str(exc)) from exc
        sample["present"] = [m in sample for m in MODALITIES]
        if not any(sample["present"]):
            raise InputError(index, "no usable modality (give an image, a text or an audio)")
        return sample

    # -- encoding -------------------------------------------------------------
    @torch.no_grad()
    def encode_samples(self, samples: list[dict[str, Any]], complete: bool = False) -> Encoded:
        """Decoded sample dicts (`decode`) as one batch."""
        batch = collate(samples, self.cfg.data, self.audio_format, len(samples))
        return self.encode_batch(batch, complete)

    @torch.no_grad()
    def encode_batch(self, batch: dict[str, Any], complete: bool = False) -> Encoded:
        """A batch in the batch contract (as the loader gives it)."""
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        present = batch["present"]
        emb = {m: e.float() for m, e in self.model(batch)["emb"].items()}
        imputed = torch.zeros_like(present)
        variance = {m: torch.zeros(present.shape[0], device=self.device) for m in MODALITIES}
        if complete:
            calibrator = self.completion.calibrator
            if calibrator is None:
                raise ValueError(
                    f"{self.source} was trained with calibration.method={self.cfg.calibration.method}: it has no "
                    "calibrator to complete missing modalities with (train with calibration.method=calmrl)"
                )
            has_any = present.any(1, keepdim=True)
            done = calibrator.impute(emb, present)  # what training's step B aligns
            posterior = calibrator.e_step(emb, present)
            imputed = ~present & has_any
            cov = posterior.pattern_cov  # [P, k, k]
            for j, m in enumerate(MODALITIES):
                W = calibrator.W[j]  # [d, k]
                per_pattern = torch.einsum("dk,pkl,dl->p", W, cov, W) / calibrator.dim + calibrator.sigma2[j]
                var = per_pattern[posterior.groups.index].float()
                variance[m] = torch.where(imputed[:, j], var, torch.zeros_like(var))
                emb[m] = torch.where(imputed[:, j : j + 1], done[m].float(), emb[m])
        return Encoded(
            emb={m: e.cpu() for m, e in emb.items()},
            observed=present.cpu(),
            imputed=imputed.cpu(),
            variance={m: v.cpu() for m, v in variance.items()},
        )

    def encode(
        self,
        images: Sequence[ImageInput] | None = None,
        texts: Sequence[str | None] | None = None,
        audio: Sequence[AudioInput] | None = None,
        complete: bool = False,
        batch_size: int = 64,
    ) -> Encoded:
        """Embed rows of inputs (lists of equal length; None entries are missing), in batches."""
        given = {name: v for name, v in (("images", images), ("texts", texts), ("audio", audio)) if v is not None}
        if not given:
            raise ValueError("nothing to encode: give images=, texts= and/or audio=")
        lengths = {name: len(v) for name, v in given.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"inputs of different lengths {lengths}: one entry per row (None where missing)")
        n = next(iter(lengths.values()))
        if isinstance(texts, str) or isinstance(images, (str, bytes)) or isinstance(audio, (str, bytes)):
            raise ValueError("give lists of inputs (one entry per row), not a single string or bytes")
        parts: list[Encoded] = []
        for start in range(0, n, batch_size):
            rows = range(start, min(start + batch_size, n))
            samples = [
                self.decode(
                    i,
                    images[i] if images is not None else None,
                    texts[i] if texts is not None else None,
                    audio[i] if audio is not None else None,
                )
                for i in rows
            ]
            parts.append(self.encode_samples(samples, complete))
        return Encoded(
            emb={m: torch.cat([p.emb[m] for p in parts]) for m in MODALITIES},
            observed=torch.cat([p.observed for p in parts]),
            imputed=torch.cat([p.imputed for p in parts]),
            variance={m: torch.cat([p.variance[m] for p in parts]) for m in MODALITIES},
        )
