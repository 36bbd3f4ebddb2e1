"""Raw tar samples into the batch contract: decoding one sample, collating a batch.

A raw sample is webdataset's dict of bytes per extension (`png`, `txt`,
`flac`, `json`, ...). `SampleDecoder` checks it against its metadata, picks
one audio track, hides the modalities `data.extra_missing` imposes on
training streams (never decoding them) and decodes the rest; `collate`
stacks decoded samples into one batch, computing all log-mels in one call.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from data_pipeline.contract import MODALITIES, DataConfig
from data_pipeline.decode import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    TEXT_EXTENSIONS,
    AudioFormat,
    DecodeError,
    decode_image,
    decode_text,
    decode_waveform,
    log_mel_batch,
)
from data_pipeline.errors import DataError
from data_pipeline.missing import keep_mask
from data_pipeline.tokenizer import load_tokenizer


class SampleDecoder:
    """Raw tar sample (dict of bytes) -> decoded tensors + present mask."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer_json: str,
        impose_missing: bool = False,
        undecoded: frozenset[str] = frozenset(),
    ):
        """`impose_missing`: hide `cfg.extra_missing` of the modalities (training streams only);
        `undecoded`: modalities marked present when the sample holds them but never decoded
        (a frozen tower's outputs come from a feature cache instead: pretrain/feature_cache.py)."""
        self.cfg = cfg
        self.undecoded = frozenset(undecoded)
        self.impose_missing = impose_missing and cfg.extra_missing > 0
        self.tokenizer = load_tokenizer(tokenizer_json, cfg.max_text_len)
        self.audio = AudioFormat(cfg.sample_rate, cfg.audio_seconds, cfg.n_mels, cfg.n_fft, cfg.hop_length)

    @staticmethod
    def _find(raw: dict[str, Any], extensions: tuple[str, ...]) -> bytes | None:
        for ext in extensions:
            if ext in raw:
                return raw[ext]
        return None

    def _pick_track(self, raw: dict[str, Any], meta: dict[str, Any], epoch: int) -> bytes | None:
        tracks = [t for t in meta.get("audio_tracks", []) if t.get("name") in raw]
        if not tracks:
            return self._find(raw, AUDIO_EXTENSIONS)
        policy = self.cfg.audio_policy
        if policy == "first":
            return raw[tracks[0]["name"]]
        if policy != "random":
            kind, _, lang = policy.partition(":")
            matching = [t for t in tracks if t.get("kind") == kind and (not lang or t.get("lang") == lang)]
            tracks = matching or tracks
        rng = random.Random(f"{self.cfg.seed}/{raw.get('__key__')}/{epoch}")
        return raw[rng.choice(tracks)["name"]]

    def __call__(self, raw: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        key, shard = raw.get("__key__", "?"), raw.get("__url__", "?")
        try:
            if "json" not in raw:
                raise DecodeError("metadata (KEY.json) missing: the shard may be truncated")
            meta = json.loads(raw["json"])
            out: dict[str, Any] = {"key": key}
            image = self._find(raw, IMAGE_EXTENSIONS)
            text = self._find(raw, TEXT_EXTENSIONS)
            audio = self._pick_track(raw, meta, epoch)
            found = [m for m, v in zip(MODALITIES, (image, text, audio)) if v is not None]
            listed = meta.get("modalities")
            if listed is not None and set(listed) != set(found):
                raise DecodeError(f"metadata lists {listed} but the shard holds {found}")
            if not found:
                raise DecodeError("sample holds no modality")
            if self.impose_missing:  # hidden entries are never decoded
                keep = keep_mask(
                    key,
                    [v is not None for v in (image, text, audio)],
                    self.cfg.extra_missing,
                    self.cfg.extra_missing_seed,
                    self.cfg.extra_missing_mode,
                )
                image, text, audio = (v if k else None for v, k in zip((image, text, audio), keep))
            skip = self.undecoded
            if image is not None and "image" not in skip:
                out["image"] = decode_image(image, self.cfg.image_size)
            if text is not None and "text" not in skip:  # id lists: `collate` makes one tensor of the batch's
                enc = self.tokenizer.encode(decode_text(text))
                out["text"], out["text_mask"] = enc.ids, enc.attention_mask
            if audio is not None and "audio" not in skip:  # the waveform: `collate` computes the log-mels
                out["audio"] = decode_waveform(audio, self.audio)
            out["present"] = [v is not None for v in (image, text, audio)]
            out["label"] = int(meta.get("label", -1))
            return out
        except (DecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"sample '{key}' in shard {shard}: {exc}") from exc


def collate(samples: list[dict[str, Any]], cfg: DataConfig, audio: AudioFormat, batch_size: int) -> dict[str, Any]:
    """Stack samples into the batch contract; pad to `batch_size` with absent rows (zeros)."""
    rows = samples + [None] * (batch_size - len(samples))
    image = torch.zeros(batch_size, 3, cfg.image_size, cfg.image_size)
    spectrogram = torch.zeros(batch_size, cfg.n_mels, audio.num_frames)
    no_text = [0] * cfg.max_text_len
    for i, s in enumerate(samples):
        if "image" in s:
            image[i] = s["image"]
    with_audio = [i for i, s in enumerate(samples) if "audio" in s]
    if with_audio:
        spectrogram[with_audio] = log_mel_batch(np.stack([samples[i]["audio"] for i in with_audio]), audio)
    return {
        "image": image,
        "text": torch.tensor([s.get("text", no_text) if s else no_text for s in rows], dtype=torch.long),
        "text_mask": torch.tensor([s.get("text_mask", no_text) if s else no_text for s in rows], dtype=torch.bool),
        "audio": spectrogram,
        "present": torch.tensor([s["present"] if s else [False] * len(MODALITIES) for s in rows], dtype=torch.bool),
        "label": torch.tensor([s["label"] if s else -1 for s in rows], dtype=torch.long),
        "key": [s["key"] if s else "" for s in rows],
    }
