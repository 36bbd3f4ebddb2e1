"""The batch contract (docs/design.md) and the data settings every layer agrees on.

A batch is a dict: `image` [B, C, H, W] float, `text` [B, L] token ids with
`text_mask`, `audio` [B, n_mels, T] log-mels (zeros where a modality is
absent), `present` [B, |M|] bool in the order of `MODALITIES`, `label` [B]
and `key` (a list of B sample keys; "" marks a padding row). Everything above
the data pipeline (model, calibrator, objectives, evaluation) indexes
modalities through `MODALITIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES: tuple[str, ...] = ("image", "text", "audio")


@dataclass
class DataConfig:
    shards: str = ""  # a split folder holding index.json (local path or s3://)
    batch_size: int = 32  # per rank, per micro-step
    num_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 0
    image_size: int = 32
    max_text_len: int = 24
    sample_rate: int = 8000
    audio_seconds: float = 0.5
    n_mels: int = 32
    n_fft: int = 256
    hop_length: int = 128
    # Which of a sample's audio tracks to use: "random" (a new draw per epoch),
    # "first", or "KIND" / "KIND:LANG" (e.g. "description:en"), falling back to random.
    audio_policy: str = "random"
    tokenizer: str = ""  # "" = the split's tokenizer.json; "minilm" or a tokenizer.json path for pretrained text towers
    resampled: bool = False  # draw shards with replacement; epochs become virtual
    epoch_samples: int = 0  # resampled mode: samples per reader per virtual epoch (0: its shards' count)
    # Extra missing modalities imposed on the training stream (never on evaluation):
    # see data_pipeline/missing.py. "instance": this fraction of multi-modal samples
    # lose a random non-empty proper subset; "entry": each modality hidden independently;
    # "keep_text": text stays, this fraction of samples lose image, audio or both.
    extra_missing: float = 0.0
    extra_missing_mode: str = "instance"
    extra_missing_seed: int = 0


def pattern_name(present: list[str] | tuple[str, ...]) -> str:
    """Canonical name of a missing pattern (its observed modalities), e.g. 'image+text'."""
    return "+".join(m for m in MODALITIES if m in present)
