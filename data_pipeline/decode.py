"""Decoding of one modality from the bytes stored in a shard.

Images go through PIL (SVG is first rasterised by resvg, `rasterise_svg`),
audio through soundfile (ogg/flac/wav/mp3) and librosa (resampling and
log-mel), text through a `tokenizers` tokenizer. Each function raises
`DecodeError` naming what failed; the reader adds the sample key and shard.
"""

from __future__ import annotations

import contextlib
import functools
import io
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

import librosa
import numpy as np
import resvg_py
import soundfile
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTENSIONS = ("flac", "ogg", "wav", "mp3")
TEXT_EXTENSIONS = ("txt",)

# An SVG is rasterised to this longest side (aspect kept), both when a build
# stores it (as PNG) and when `decode_image` is handed one at inference, so the
# two see the same pixels. Training images are a few hundred pixels a side.
SVG_SIDE = 512
# The largest SVG file the rasteriser reads (Tux Paint's largest is 236 KB). The
# declared width and height never size the canvas: the picture is always fitted
# into SVG_SIDE x SVG_SIDE, so an SVG declaring 10^6 x 10^6 costs what a small one does.
MAX_SVG_BYTES = 16 << 20
# CSS pixels per inch: what `pt`, `mm`, `in` are converted with (resvg-py's
# default of 0 makes every such size zero, e.g. Inkscape's width="128pt").
SVG_DPI = 96.0
# The most pixels of a raster picture an SVG embeds or refers to (resvg decodes
# it whole: an 8000 x 8000 PNG of 79 KB costs 300 MB): a 12 MP photo passes.
MAX_SVG_IMAGE_PIXELS = 4096 * 4096
_HREF_ATTRIBUTES = ("href", "{http://www.w3.org/1999/xlink}href")
_BOM = b"\xef\xbb\xbf"
_SVG_STARTS = (b"<svg", b"<?xml", b"<!doctype svg")


class DecodeError(ValueError):
    """The bytes of one modality of one sample cannot be decoded."""


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int
    seconds: float
    n_mels: int
    n_fft: int
    hop_length: int

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))

    @property
    def num_frames(self) -> int:
        # librosa centres frames: one frame per hop plus the first.
        return 1 + self.num_samples // self.hop_length


def is_svg(data: bytes) -> bool:
    """Whether `data` is SVG text (starts with `<svg`, `<?xml` or `<!DOCTYPE svg`
    after an optional UTF-8 byte-order mark and whitespace): no PNG, JPEG or WebP does."""
    head = data[:256].removeprefix(_BOM).lstrip().lower()
    return head.startswith(_SVG_STARTS)


def _referenced_image(payload: bytes, what: str, origin: str, folder: Path | None, depth: int) -> None:
    """Check one picture an SVG embeds or refers to: a raster one is at most
    MAX_SVG_IMAGE_PIXELS (read from its header), an SVG one is checked in turn."""
    if is_svg(payload):
        _check_references(payload, f"{origin} ({what})", folder, depth + 1)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        width = height = MAX_SVG_IMAGE_PIXELS  # more than Pillow opens: too large either way
    except Exception:
        return  # not a picture Pillow knows: resvg skips what it cannot decode either
    if width * height > MAX_SVG_IMAGE_PIXELS:
        raise DecodeError(
            f"{origin}: SVG embeds {what}, a picture of {width} x {height} pixels, more than the "
            f"{MAX_SVG_IMAGE_PIXELS:,} the rasteriser decodes; downscale it"
        )


def _check_references(data: bytes, origin: str, folder: Path | None, depth: int = 0) -> None:
    """Refuse what would make resvg read outside the SVG and its folder or
    decode an unbounded picture: an `href` that is an absolute path or climbs
    out with `..`; a raster picture (embedded as a data: URL, or a file beside
    the SVG) over MAX_SVG_IMAGE_PIXELS; SVG nested deeper than 4. Fragment
    references (`#id`) are the SVG's own. The XML is parsed with the standard
    library's expat, which expands no external entity and bounds entity
    expansion."""
    if depth > 4:
        raise DecodeError(f"{origin}: SVG nests SVG pictures more than 4 deep; flatten it")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise DecodeError(
            f"{origin}: SVG does not rasterise (not well-formed XML: {exc}); fix or replace the file"
        ) from exc
    for element in root.iter():
        for name in _HREF_ATTRIBUTES:
            href = (element.get(name) or "").strip()
            if not href or href.startswith("#"):
                continue
            if href[:5].lower() == "data:":
                try:
                    with urllib.request.urlopen(href) as response:  # the standard library's data: URL decoder
                        payload = response.read()
                except (ValueError, OSError) as exc:
                    raise DecodeError(f"{origin}: SVG embeds a data: URL that does not decode ({exc})") from exc
                _referenced_image(payload, "a data: URL", origin, None, depth)
                continue
            if "://" in href or href.lower().startswith("file:"):
                continue  # a URL: resvg fetches none
            path = PurePosixPath(href)
            if path.is_absolute() or ".." in path.parts:
                raise DecodeError(
                    f"{origin}: SVG refers to {href[:200]!r}, outside its own folder, which the rasteriser "
                    "does not read; embed the picture in the SVG (Inkscape: Extensions > Images > Embed Images)"
                )
            if folder is not None and (folder / path).is_file():
                _referenced_image((folder / path).read_bytes(), repr(href), origin, folder, depth)


def rasterise_svg(data: bytes, origin: str = "SVG", side: int = SVG_SIDE, folder: Path | None = None) -> bytes:
    """SVG bytes -> PNG bytes (RGBA, transparent where the SVG draws nothing) with
    the longest side `side` and the SVG's aspect kept, rendered by resvg.

    `folder` is where the SVG file lies: a picture it refers to by a relative
    path is read from there (a build passes the file's folder); without one
    (bytes handed to `decode_image`), none is read, whatever the working
    directory holds. System fonts are not loaded: the picture is the same on
    every machine (and an SVG whose only content is text in a font it does not
    embed renders nothing, which is refused). Raises DecodeError naming `origin`
    for a file that is too large, not UTF-8, not well-formed, of zero size,
    refers outside its folder (`_check_references`), or draws nothing."""
    if len(data) > MAX_SVG_BYTES:
        raise DecodeError(
            f"{origin}: SVG of {len(data):,} bytes is larger than the {MAX_SVG_BYTES:,} the rasteriser reads; "
            "simplify it or convert it to PNG"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{origin}: SVG is not UTF-8 ({exc}); re-save it as UTF-8") from exc
    _check_references(data.removeprefix(_BOM), origin, folder)
    with contextlib.ExitStack() as stack:
        resources = str(folder) if folder is not None else stack.enter_context(tempfile.TemporaryDirectory())
        try:
            png = resvg_py.svg_to_bytes(
                svg_string=text, width=side, height=side, dpi=SVG_DPI, skip_system_fonts=True, resources_dir=resources
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # ValueError for bad SVG; pyo3 reports a Rust panic as a BaseException
            raise DecodeError(
                f"{origin}: SVG does not rasterise ({type(exc).__name__}: {exc}); fix or replace the file"
            ) from exc
    with Image.open(io.BytesIO(png)) as img:
        if img.getchannel("A").getbbox() is None:
            raise DecodeError(
                f"{origin}: SVG renders nothing (every pixel transparent at {img.width} x {img.height}; "
                "text in a font it does not embed?); convert its text to paths or use a PNG"
            )
    return bytes(png)


def decode_image(data: bytes, size: int, origin: str = "image") -> torch.Tensor:
    """PNG/JPEG/WebP or SVG bytes -> float [3, size, size] in [-1, 1].

    SVG (detected by content, `is_svg`) is rasterised as a build stores it
    (`rasterise_svg`, longest side SVG_SIDE), then decoded as that PNG; `origin`
    names the file in an SVG's errors."""
    if is_svg(data):
        data = rasterise_svg(data, origin)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            img: Image.Image = opened
            if img.mode in ("RGBA", "LA", "P") or "transparency" in img.info:
                # Stamps and icons carry alpha: put them on white, not on the
                # arbitrary colour hidden under transparent pixels.
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            else:
                img = img.convert("RGB")
            if img.width != img.height:
                # Letterbox on white: a square resize would distort the picture.
                side = max(img.size)
                canvas = Image.new("RGB", (side, side), (255, 255, 255))
                canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
                img = canvas
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.float32)
    except Exception as exc:  # PIL raises many types for bad bytes
        raise DecodeError(f"image does not decode ({type(exc).__name__}: {exc})") from exc
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def load_waveform(data: bytes, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Audio file bytes -> mono float32 waveform at `sample_rate`, at most
    `max_seconds` long (only that much is decoded and resampled)."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            frames = -1 if max_seconds is None else int(np.ceil(max_seconds * rate)) + 1
            wave = f.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:
        raise DecodeError(f"audio does not decode ({type(exc).__name__}: {exc})") from exc
    if wave.shape[0] == 0:
        raise DecodeError("audio holds no samples")
    mono = wave.mean(axis=1)
    if rate != sample_rate:
        mono = librosa.resample(mono, orig_sr=rate, target_sr=sample_rate)
    return mono.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def mel_filterbank(fmt: AudioFormat) -> np.ndarray:
    """The [n_mels, 1 + n_fft/2] filterbank, built once per format (librosa's
    melspectrogram would rebuild it for every clip)."""
    return librosa.filters.mel(sr=fmt.sample_rate, n_fft=fmt.n_fft, n_mels=fmt.n_mels).astype(np.float32)


def fit_length(wave: np.ndarray, fmt: AudioFormat) -> np.ndarray:
    """Crop or zero-pad a waveform to fmt.seconds ([num_samples])."""
    n = fmt.num_samples
    return wave[:n] if wave.shape[0] >= n else np.pad(wave, (0, n - wave.shape[0]))


def log_mel_batch(waves: np.ndarray, fmt: AudioFormat) -> torch.Tensor:
    """Waveforms [B, num_samples] -> log-mel [B, n_mels, num_frames].

    One STFT call and one filterbank product for the whole batch: librosa's
    per-call overhead dominates short clips (0.57 ms a clip one by one against
    0.10 ms in a batch of 32 at 8 kHz, 0.5 s), and the result is identical."""
    power = np.abs(librosa.stft(waves, n_fft=fmt.n_fft, hop_length=fmt.hop_length)) ** 2
    mel = mel_filterbank(fmt) @ power
    return torch.from_numpy(np.log(mel + 1e-6).astype(np.float32))


def log_mel(wave: np.ndarray, fmt: AudioFormat) -> torch.Tensor:
    """Waveform -> log-mel [n_mels, num_frames], cropped or zero-padded to fmt.seconds."""
    return log_mel_batch(fit_length(wave, fmt)[None], fmt)[0]


def decode_waveform(data: bytes, fmt: AudioFormat) -> np.ndarray:
    """Audio file bytes -> the [num_samples] waveform `log_mel` would transform
    (the loader batches the transform: see `log_mel_batch`)."""
    return fit_length(load_waveform(data, fmt.sample_rate, fmt.seconds), fmt)


def decode_audio(data: bytes, fmt: AudioFormat) -> torch.Tensor:
    return log_mel(load_waveform(data, fmt.sample_rate, fmt.seconds), fmt)


def decode_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"caption is not UTF-8 ({exc})") from exc
    if not text:
        raise DecodeError("caption is empty")
    return text
