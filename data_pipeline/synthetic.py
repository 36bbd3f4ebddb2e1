"""A synthetic tri-modal source with known latent attributes.

Each instance draws attributes (shape, colour, size, position). They are
rendered three ways: an image (PIL drawing), a caption (templated English) and
audio (tones: pitch from colour, number of beeps from shape, beep length from
size, a low hum from position). Per-modality missing rates drop modalities,
keeping at least one per instance. The attributes are stored in the metadata
so that evaluation can check what a representation encodes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.contract import MODALITIES
from data_pipeline.shards import ShardSetWriter
from data_pipeline.tokenizer import train_tokenizer

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "{size} {colour} {shape}, {position}",
    "there is a {colour} {shape} at the {position}, it is {size}",
    "the {position} holds a {size} {shape} coloured {colour}",
)
PITCH = dict(zip(COLOURS, (330.0, 392.0, 440.0, 523.0, 587.0, 659.0)))
HUM = dict(zip(POSITIONS, (110.0, 140.0, 170.0, 200.0)))
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SyntheticSpec:
    num_samples: int = 2000
    image_size: int = 32
    sample_rate: int = 8000
    audio_seconds: float = 0.5
    missing: tuple[float, float, float] = (0.2, 0.1, 0.3)  # image, text, audio
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    shard_size: int = 250
    seed: int = 0
    vocab_size: int = 300


def draw_attributes(rng: np.random.Generator) -> dict[str, str]:
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "size": SIZES[rng.integers(len(SIZES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
    }


def label_of(attrs: dict[str, str]) -> int:
    """Class id for zero-shot evaluation: shape x colour (24 classes)."""
    return SHAPES.index(attrs["shape"]) * len(COLOURS) + list(COLOURS).index(attrs["colour"])


def render_image(attrs: dict[str, str], size: int, rng: np.random.Generator) -> bytes:
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    half = size / 2
    radius = (0.35 if attrs["size"] == "large" else 0.2) * half
    jitter = rng.uniform(-0.08, 0.08, size=2) * size
    cx = (0.25 * size if "left" in attrs["position"] else 0.75 * size) + jitter[0]
    cy = (0.25 * size if "top" in attrs["position"] else 0.75 * size) + jitter[1]
    fill = COLOURS[attrs["colour"]]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render_caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(**attrs)


def render_audio(attrs: dict[str, str], sample_rate: int, seconds: float, rng: np.random.Generator) -> bytes:
    n = int(round(sample_rate * seconds))
    t = np.arange(n) / sample_rate
    beeps = SHAPES.index(attrs["shape"]) + 1
    beep_len = (0.6 if attrs["size"] == "large" else 0.3) * seconds / beeps
    envelope = np.zeros(n)
    for b in range(beeps):
        start = b * seconds / beeps
        envelope[(t >= start) & (t < start + beep_len)] = 1.0
    pitch = PITCH[attrs["colour"]] * rng.uniform(0.98, 1.02)
    wave = 0.5 * envelope * np.sin(2 * np.pi * pitch * t)
    wave += 0.15 * np.sin(2 * np.pi * HUM[attrs["position"]] * t)
    wave += 0.02 * rng.standard_normal(n)
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), sample_rate, format="FLAC")
    return buf.getvalue()


def draw_present(missing: tuple[float, float, float], rng: np.random.Generator) -> list[str]:
    """Modalities kept for one instance; redrawn until at least one is kept."""
    while True:
        keep = [m for m, rate in zip(MODALITIES, missing) if rng.random() >= rate]
        if keep:
            return keep


def make_sample(index: int, split: str, spec: SyntheticSpec, rng: np.random.Generator) -> dict:
    attrs = draw_attributes(rng)
    present = draw_present(spec.missing, rng)
    key = f"syn{index:08d}"
    sample: dict = {"__key__": key}
    caption = render_caption(attrs, rng)
    if "image" in present:
        sample["png"] = render_image(attrs, spec.image_size, rng)
    if "text" in present:
        sample["txt"] = caption.encode()
    if "audio" in present:
        sample["flac"] = render_audio(attrs, spec.sample_rate, spec.audio_seconds, rng)
    sample["json"] = {
        "source": "synthetic",
        "split": split,
        "label": label_of(attrs),
        "modalities": present,
        "attributes": attrs,
    }
    return sample


def build_synthetic(out_dir: str | Path, spec: SyntheticSpec, progress: bool = True) -> dict[str, dict]:
    """Write train/val/test shard splits and a tokenizer under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    counts = [int(round(f * spec.num_samples)) for f in spec.split_fractions]
    counts[0] = spec.num_samples - sum(counts[1:])
    # The tokenizer sees every caption the templates can make, not just the drawn ones.
    corpus = [
        t.format(shape=s, colour=c, size=z, position=p)
        for t in TEMPLATES
        for s in SHAPES
        for c in COLOURS
        for z in SIZES
        for p in POSITIONS
    ]
    atomic_write(out_dir / "tokenizer.json", train_tokenizer(corpus, spec.vocab_size).to_str())
    indexes = {}
    start = 0
    bar = tqdm(total=spec.num_samples, desc="synthetic shards", disable=not progress, unit="sample")
    for split, count in zip(SPLITS, counts):
        extra = {
            "source": "synthetic",
            "split": split,
            "tokenizer": "../tokenizer.json",
            "num_classes": len(SHAPES) * len(COLOURS),
            "sample_rate": spec.sample_rate,
            "classes": [f"{c} {s}" for s in SHAPES for c in COLOURS],
            "prompt_template": "a {}",
        }
        with ShardSetWriter(out_dir / split, spec.shard_size, extra) as writer:
            for i in range(start, start + count):
                writer.write(make_sample(i, split, spec, rng))
                bar.update(1)
        assert writer.index is not None  # close() wrote it
        indexes[split] = writer.index
        start += count
    bar.close()
    return indexes
