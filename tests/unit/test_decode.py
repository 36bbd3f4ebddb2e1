"""Decoders: alpha on white, letterboxing, SVG rasterised, every stored image
format, audio (MP3 too) cropped before resampling."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from data_pipeline.decode import (
    AUDIO_EXTENSIONS,
    MAX_SVG_BYTES,
    SVG_SIDE,
    AudioFormat,
    DecodeError,
    decode_audio,
    decode_image,
    is_svg,
    load_waveform,
    rasterise_svg,
)


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


# ---------------------------------------------------------------- SVG, and every stored image format

SVG_NS = 'xmlns="http://www.w3.org/2000/svg"'
RED_CIRCLE = f'<svg {SVG_NS} width="100" height="50"><circle cx="50" cy="25" r="20" fill="#ff0000"/></svg>'


def rgba(png_bytes: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png_bytes)) as img:
        assert img.format == "PNG"
        return img.convert("RGBA")


def test_svg_is_rasterised_to_the_longest_side_with_alpha_and_aspect_kept():
    img = rgba(rasterise_svg(RED_CIRCLE.encode()))
    assert img.size == (SVG_SIDE, SVG_SIDE // 2)  # 100 x 50 fitted into 512 x 512
    assert img.getpixel((SVG_SIDE // 2, SVG_SIDE // 4)) == (255, 0, 0, 255)  # red centre
    assert img.getchannel("A").getpixel((0, 0)) == 0  # transparent corner
    tall = rgba(rasterise_svg(RED_CIRCLE.replace('width="100" height="50"', 'viewBox="0 0 100 200"').encode(), side=64))
    assert tall.size == (32, 64)


def test_svg_sizes_in_points_use_css_pixels_per_inch():
    # Inkscape writes width="128pt": with resvg-py's default dpi of 0 it is "an invalid size".
    img = rgba(rasterise_svg(RED_CIRCLE.replace('width="100" height="50"', 'width="96pt" height="48pt"').encode()))
    assert img.size == (SVG_SIDE, SVG_SIDE // 2)


def test_huge_declared_svg_size_does_not_size_the_canvas():
    huge = f'<svg {SVG_NS} width="1000000" height="1000000"><rect width="1000000" height="1000000" fill="blue"/></svg>'
    img = rgba(rasterise_svg(huge.encode()))
    assert img.size == (SVG_SIDE, SVG_SIDE) and img.getpixel((5, 5)) == (0, 0, 255, 255)
    with pytest.raises(DecodeError, match=r"big\.svg: SVG of [\d,]+ bytes is larger"):
        rasterise_svg(b"<svg " + b" " * MAX_SVG_BYTES + b"/>", "big.svg")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"<svg this is not xml", "does not rasterise"),
        (f'<svg {SVG_NS} width="0" height="0"><rect width="1" height="1"/></svg>'.encode(), "does not rasterise"),
        (f'<svg {SVG_NS} width="10" height="10"></svg>'.encode(), "renders nothing"),
        (b'<?xml version="1.0" encoding="latin-1"?><svg>\xe9</svg>', "not UTF-8"),
    ],
)
def test_broken_svg_names_the_file(data, message):
    with pytest.raises(DecodeError, match=message) as err:
        rasterise_svg(data, "stamps/broken.svg")
    assert str(err.value).startswith("stamps/broken.svg: ")
    with pytest.raises(DecodeError, match=message):  # what inference sees
        decode_image(data, 8, origin="upload.svg")


def test_decode_image_takes_svg_bytes_as_a_build_stores_them():
    data = b"\xef\xbb\xbf \n" + RED_CIRCLE.encode()  # a BOM and whitespace before <svg
    assert is_svg(data) and is_svg(b'<?xml version="1.0"?>\n<svg/>') and is_svg(b"<!DOCTYPE svg><svg/>")
    x = decode_image(data, 16)
    assert torch.equal(x, decode_image(rasterise_svg(data), 16))  # inference = the stored PNG
    assert torch.allclose(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))  # red centre
    assert torch.allclose(x[:, 0, 0], torch.ones(3))  # letterbox band / transparency on white


def encoded(fmt: str) -> bytes:
    img = Image.new("RGB", (24, 16), (0, 0, 255))
    img.paste((255, 0, 0), (8, 4, 16, 12))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_raster_formats_decode_and_are_not_taken_for_svg(fmt):
    data = encoded(fmt)
    assert not is_svg(data)
    x = decode_image(data, 24)
    assert x.shape == (3, 24, 24)
    assert torch.allclose(x[:, 12, 12], torch.tensor([1.0, -1.0, -1.0]), atol=0.1)  # red centre
    assert torch.allclose(x[:, 6, 2], torch.tensor([-1.0, -1.0, 1.0]), atol=0.1)  # blue edge
    assert torch.allclose(x[:, 0, 12], torch.ones(3))  # letterbox band


def test_png_decoding_is_bit_for_bit_what_it_was():
    """decode_image's PNG path as before SVG support: alpha on white, letterbox, bicubic resize."""
    img = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    img.paste((10, 200, 30, 128), (5, 5, 25, 15))
    rgb = Image.new("RGB", img.size, (255, 255, 255))
    rgb.paste(img, mask=img.getchannel("A"))
    canvas = Image.new("RGB", (30, 30), (255, 255, 255))
    canvas.paste(rgb, (0, 5))
    expected = torch.from_numpy(np.asarray(canvas.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32))
    assert torch.equal(decode_image(png(img), 16), expected.permute(2, 0, 1) / 127.5 - 1.0)


def test_mp3_decodes_at_its_own_rate():
    rate = 22050
    t = np.arange(rate) / rate
    buf = io.BytesIO()
    try:
        soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="MP3")
    except (soundfile.LibsndfileError, ValueError, TypeError) as exc:
        pytest.skip(f"this libsndfile ({soundfile.__libsndfile_version__}) cannot write MP3: {exc}")
    assert "mp3" in AUDIO_EXTENSIONS
    wave = load_waveform(buf.getvalue(), 8000)
    assert abs(wave.shape[0] - 8000) < 400  # MP3 pads a few frames; resampled from 22050 to 8000
    spectrum = np.abs(np.fft.rfft(wave[1000:7000]))
    assert abs(np.argmax(spectrum) * 8000 / 6000 - 440) < 5


def svg_with_image(href: str) -> bytes:
    return (
        f'<svg {SVG_NS} xmlns:xlink="http://www.w3.org/1999/xlink" width="10" height="10">'
        f'<rect width="2" height="2" fill="red"/><image width="10" height="10" xlink:href="{href}"/></svg>'
    ).encode()


def test_svg_reads_pictures_only_from_its_own_folder(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4), (0, 255, 0)).save(tmp_path / "green.png")
    monkeypatch.chdir(tmp_path)  # resvg alone would read green.png from the working directory
    centre = (SVG_SIDE // 2, SVG_SIDE // 2)
    assert rgba(rasterise_svg(svg_with_image("green.png"))).getchannel("A").getpixel(centre) == 0  # bytes: not read
    assert rgba(rasterise_svg(svg_with_image("green.png"), folder=tmp_path)).getpixel(centre) == (0, 255, 0, 255)
    for href in (str(tmp_path / "green.png"), "../elsewhere/green.png"):
        with pytest.raises(DecodeError, match="outside its own folder") as err:
            rasterise_svg(svg_with_image(href), "doc.svg", folder=tmp_path)
        assert str(err.value).startswith("doc.svg: ") and "Embed Images" in str(err.value)


def test_svg_embedding_a_huge_picture_is_refused_before_resvg_decodes_it(tmp_path):
    import base64

    Image.new("L", (4097, 4097), 128).save(tmp_path / "poster.png")  # 16.8 MP in 17 KB
    data_url = "data:image/png;base64," + base64.b64encode((tmp_path / "poster.png").read_bytes()).decode()
    with pytest.raises(DecodeError, match="embeds a data: URL, a picture of 4097 x 4097 pixels"):
        rasterise_svg(svg_with_image(data_url), "doc.svg")
    with pytest.raises(DecodeError, match="embeds 'poster.png', a picture of 4097 x 4097 pixels"):
        rasterise_svg(svg_with_image("poster.png"), "doc.svg", folder=tmp_path)
    small = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 255, 0)).save(small, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    assert rgba(rasterise_svg(svg_with_image(data_url))).getpixel((SVG_SIDE // 2, SVG_SIDE // 2)) == (0, 255, 0, 255)
