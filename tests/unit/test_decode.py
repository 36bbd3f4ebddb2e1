"""Decoders: alpha on white, letterboxing, audio cropped before resampling."""

from __future__ import annotations

import io

import numpy as np
import soundfile
import torch
from PIL import Image

from data_pipeline.decode import AudioFormat, decode_audio, decode_image, load_waveform


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_transparent_pixels_become_white_not_the_hidden_colour():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # black under full transparency
    img.paste((255, 0, 0, 255), (2, 2, 6, 6))
    x = decode_image(png(img), 8)
    assert torch.allclose(x[:, 0, 0], torch.ones(3))  # white corner
    assert torch.allclose(x[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))  # red centre


def test_non_square_images_are_letterboxed():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    x = decode_image(png(img), 20)
    assert torch.allclose(x[:, 0, 10], torch.ones(3))  # padding band on top
    assert torch.allclose(x[:, 10, 10], torch.tensor([-1.0, -1.0, 1.0]))


def test_long_stereo_audio_is_cropped_then_resampled():
    rate = 44100
    t = np.arange(rate * 10) / rate
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, stereo, rate, format="OGG")
    wave = load_waveform(buf.getvalue(), 8000, max_seconds=0.5)
    assert 4000 <= wave.shape[0] <= 4010
    fmt = AudioFormat(8000, 0.5, 32, 256, 128)
    mel = decode_audio(buf.getvalue(), fmt)
    assert mel.shape == (32, fmt.num_frames) and torch.isfinite(mel).all()
    assert mel.mean(1).argmax() == mel.mean(1)[:12].argmax()  # 440 Hz energy sits in a low mel band


def test_log_mel_matches_librosa_melspectrogram():
    import librosa

    fmt = AudioFormat(8000, 0.5, 32, 256, 128)
    wave = np.random.default_rng(0).standard_normal(4000).astype(np.float32)
    from data_pipeline.decode import log_mel

    ref = librosa.feature.melspectrogram(y=wave, sr=8000, n_fft=256, hop_length=128, n_mels=32)
    assert torch.allclose(log_mel(wave, fmt), torch.from_numpy(np.log(ref + 1e-6)).float(), atol=1e-4)
