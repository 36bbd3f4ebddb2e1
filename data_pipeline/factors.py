"""Synthetic data with headroom: continuous latent factors seen through partial, noisy views.

Every instance draws eight independent factors f ~ N(0, 1). Each modality
sees six of them, each through its own noise (`view_noise`), and renders
what it sees:

- image (factors 0-5): a coloured blob on a grating; hue, lightness, x, y,
  radius of the blob and the grating's angle follow the six views;
- text (factors 0-3, 6, 7): one word per view, the factor's name and its bin
  among `text_bins` equal-probability bins (`hue4 tilt7 ...`, in random order);
- audio (factors 2-7): two tones, an amplitude modulation, their balance,
  a noise burst and a decay, one property per view.

So every pair of modalities shares four factors, each modality holds two the
other two lack (complementary information), no two instances are alike, and
a missing modality can be inferred only in part from the others. The
metadata keeps the factors and each modality's view of them, and every
split's index records the *ceiling*: R@1 of retrieval by the views themselves
(nearest neighbour on the shared factors' view values, text at its bins'
centres), the best any representation can do given what the modalities carry.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import soundfile
from PIL import Image
from tqdm import tqdm

from data_pipeline.atomic import atomic_write
from data_pipeline.contract import MODALITIES
from data_pipeline.shards import ShardSetWriter
from data_pipeline.sources import BuildOptions, BuildReport, SourceError
from data_pipeline.tokenizer import train_tokenizer

NUM_FACTORS = 8
FACTOR_NAMES = ("hue", "light", "xpos", "ypos", "size", "tilt", "pitch", "beat")
VIEWS: dict[str, tuple[int, ...]] = {
    "image": (0, 1, 2, 3, 4, 5),
    "text": (0, 1, 2, 3, 6, 7),
    "audio": (2, 3, 4, 5, 6, 7),
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FactorsSpec:
    num_samples: int = 8000
    image_size: int = 32
    sample_rate: int = 8000
    audio_seconds: float = 0.5
    view_noise: float = 0.15  # std of each modality's own noise on each factor it sees
    text_bins: int = 12
    missing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # image, text, audio: built complete by default
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    shard_size: int = 400
    seed: int = 0
    vocab_size: int = 300


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def text_bin(value: float, bins: int) -> int:
    """The bin of `value` among `bins` equal-probability bins of N(0, 1)."""
    return int(min(bins - 1, max(0, math.floor(NormalDist().cdf(value) * bins))))


def bin_centre(index: int, bins: int) -> float:
    """The median of N(0, 1) within bin `index` (what a caption's word says of its factor)."""
    return float(NormalDist().inv_cdf((index + 0.5) / bins))


def render_image(view: np.ndarray, size: int) -> bytes:
    hue, light, x, y, radius, tilt = (_sigmoid(float(v)) for v in view)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = math.pi * tilt
    grating = 0.5 + 0.25 * np.sin(2 * math.pi * 3.0 * (xx * math.cos(angle) + yy * math.sin(angle)))
    blob = np.exp(-((xx - (0.2 + 0.6 * x)) ** 2 + (yy - (0.2 + 0.6 * y)) ** 2) / (2 * (0.05 + 0.12 * radius) ** 2))
    colour = np.array([math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * 0.5 + 0.5
    colour = colour * (0.3 + 0.7 * light)
    pixels = grating[..., None] * (1 - blob[..., None]) + colour[None, None, :] * blob[..., None]
    buf = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def render_audio(view: np.ndarray, sample_rate: int, seconds: float, rng: np.random.Generator) -> bytes:
    tone1, tone2, modulation, balance, burst, decay = (_sigmoid(float(v)) for v in view)
    t = np.arange(int(round(sample_rate * seconds))) / sample_rate
    f1, f2 = 200.0 * 2 ** (2 * tone1), 900.0 * 2 ** (1.2 * tone2)  # 200-800 Hz and 900-2100 Hz
    am = 1.0 - 0.8 * (0.5 + 0.5 * np.sin(2 * math.pi * (2 + 10 * modulation) * t))
    envelope = np.exp(-t * (1 + 8 * decay))
    wave = envelope * am * ((1 - balance) * np.sin(2 * math.pi * f1 * t) + balance * np.sin(2 * math.pi * f2 * t))
    centre = seconds * (0.15 + 0.7 * burst)
    wave += 0.3 * np.exp(-((t - centre) ** 2) / (2 * 0.02**2)) * rng.standard_normal(t.shape)
    wave = 0.5 * wave / max(1e-6, float(np.abs(wave).max()))
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), sample_rate, format="FLAC")
    return buf.getvalue()


def render_caption(view: np.ndarray, bins: int, rng: np.random.Generator) -> tuple[str, list[int]]:
    indices = [text_bin(float(v), bins) for v in view]
    words = [f"{FACTOR_NAMES[f]}{b}" for f, b in zip(VIEWS["text"], indices)]
    return " ".join(words[i] for i in rng.permutation(len(words))), indices


def make_sample(index: int, split: str, spec: FactorsSpec, rng: np.random.Generator) -> dict[str, Any]:
    factors = rng.standard_normal(NUM_FACTORS)
    views = {m: factors[list(dims)] + spec.view_noise * rng.standard_normal(len(dims)) for m, dims in VIEWS.items()}
    present = [m for m, rate in zip(MODALITIES, spec.missing) if rng.random() >= rate] or [str(rng.choice(MODALITIES))]
    caption, bins = render_caption(views["text"], spec.text_bins, rng)
    sample: dict[str, Any] = {"__key__": f"fac{index:08d}"}
    if "image" in present:
        sample["png"] = render_image(views["image"], spec.image_size)
    if "text" in present:
        sample["txt"] = caption.encode()
    if "audio" in present:
        sample["flac"] = render_audio(views["audio"], spec.sample_rate, spec.audio_seconds, rng)
    sample["json"] = {
        "source": "factors",
        "split": split,
        "label": text_bin(float(factors[0]), spec.text_bins),  # the hue bin: a class per text bin, for zero-shot
        "modalities": present,
        "factors": [round(float(v), 5) for v in factors],
        "views": {m: [round(float(v), 5) for v in values] for m, values in views.items()},
        "text_bins": bins,
    }
    return sample


def carried_values(views: dict[str, np.ndarray], text_bins: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """What each modality carries of the factors, [N, 8] with NaN where it sees nothing:
    the views, and for text its bins' centres (the caption says no more)."""
    n = text_bins.shape[0]
    out = {}
    for m, dims in VIEWS.items():
        values = np.full((n, NUM_FACTORS), np.nan)
        if m == "text":
            centres = np.vectorize(lambda b: bin_centre(int(b), bins))(text_bins)
            values[:, list(dims)] = centres
        else:
            values[:, list(dims)] = views[m]
        out[m] = values
    return out


def _r_at_1(query: np.ndarray, keys: np.ndarray) -> float:
    distance = ((query[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    matched = np.diagonal(distance)[:, None]
    return float(((distance <= matched).sum(1) <= 1).mean())


def ceiling(carried: dict[str, np.ndarray]) -> dict[str, float]:
    """R@1 of retrieval by what the modalities carry: for every ordered pair, the nearest
    neighbour on their shared factors; for the joint rule, text against the mean of
    what image and audio carry of text's factors (and back)."""
    out: dict[str, float] = {}
    for a, b in permutations(MODALITIES, 2):
        shared = [f for f in range(NUM_FACTORS) if f in VIEWS[a] and f in VIEWS[b]]
        out[f"{a}->{b}"] = _r_at_1(carried[a][:, shared], carried[b][:, shared])
    out["mean_R@1"] = float(np.mean([out[f"{a}->{b}"] for a, b in permutations(MODALITIES, 2)]))
    dims = list(VIEWS["text"])
    joint = np.nanmean(np.stack([carried["image"][:, dims], carried["audio"][:, dims]]), axis=0)
    out["joint:anchor->data"] = _r_at_1(carried["text"][:, dims], joint)
    out["joint:data->anchor"] = _r_at_1(joint, carried["text"][:, dims])
    return out


def build_factors(out_dir: str | Path, spec: FactorsSpec, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Write train/val/test shard splits and a tokenizer under `out_dir`; each split's
    index records its ceiling."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    counts = [int(round(f * spec.num_samples)) for f in spec.split_fractions]
    counts[0] = spec.num_samples - sum(counts[1:])
    corpus = [f"{FACTOR_NAMES[f]}{b}" for f in range(NUM_FACTORS) for b in range(spec.text_bins)]
    atomic_write(out_dir / "tokenizer.json", train_tokenizer([" ".join(corpus)] * 4, spec.vocab_size).to_str())
    indexes = {}
    start = 0
    bar = tqdm(total=spec.num_samples, desc="factor shards", disable=not progress, unit="sample")
    for split, count in zip(SPLITS, counts):
        samples = []
        for i in range(start, start + count):
            samples.append(make_sample(i, split, spec, rng))
            bar.update(1)
        views = {m: np.array([s["json"]["views"][m] for s in samples]) for m in VIEWS}
        carried = carried_values(views, np.array([s["json"]["text_bins"] for s in samples]), spec.text_bins)
        extra = {
            "source": "factors",
            "split": split,
            "tokenizer": "../tokenizer.json",
            "num_classes": spec.text_bins,
            "classes": [f"hue{b}" for b in range(spec.text_bins)],
            "prompt_template": "{}",
            "sample_rate": spec.sample_rate,
            "factors": {
                "names": list(FACTOR_NAMES),
                "views": {m: list(d) for m, d in VIEWS.items()},
                "view_noise": spec.view_noise,
                "text_bins": spec.text_bins,
            },
            "ceiling": ceiling(carried),
        }
        with ShardSetWriter(out_dir / split, spec.shard_size, extra) as writer:
            for sample in samples:
                writer.write(sample)
        assert writer.index is not None  # close() wrote it
        indexes[split] = writer.index
        start += count
    bar.close()
    return indexes


def build_factors_source(opts: BuildOptions) -> BuildReport:
    """`calmrl data build --source factors`: `--num-samples`, `--image-size`, `--missing`,
    `--split-fractions`, `--seed` and `--shard-size` apply."""
    from data_pipeline.sources.common import split_summary

    if opts.input is not None or opts.cache is not None or opts.skip_bad:
        raise SourceError("--source factors takes no --input, --cache or --skip-bad")
    kwargs: dict[str, Any] = {"shard_size": opts.shard_size, "seed": opts.seed}
    for name in ("num_samples", "image_size", "missing", "split_fractions"):
        if getattr(opts, name) is not None:
            kwargs[name] = getattr(opts, name)
    indexes = build_factors(opts.out, FactorsSpec(**kwargs), progress=opts.progress)
    ceiling_r1 = indexes["test"]["ceiling"]["mean_R@1"] if "ceiling" in indexes["test"] else float("nan")
    return BuildReport(indexes, f"wrote {opts.out}: {split_summary(indexes)}; test ceiling mean R@1 {ceiling_r1:.3f}")
