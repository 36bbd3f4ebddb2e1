"""Using a trained model: export, `Encoder.encode` with calibrated completion, `calmrl embed`.

One small run (a folder of real PNG/TXT/WAV files built into shards, 4 steps of a
real DeepSpeed ZeRO-2 trainer with the CalMRL calibrator) serves every test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw

from data_pipeline.contract import MODALITIES
from data_pipeline.reader import iterate_split
from evals.vector_file import read_vectors
from pretrain.encoder import Encoder, InputError, ModelLoadError
from pretrain.export import ExportError, export_run, load_export
from pretrain.run_dir import RunDir
from tests.helpers import run_cli, run_distributed, tiny_config

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("circle", "square")


def _write_record(root: Path, i: int) -> None:
    colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
    stem = root / f"rec{i:02d}"
    if i % 5 != 4:  # every fifth record has no picture
        img = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
        draw = ImageDraw.Draw(img)
        box = (8 + i % 4, 6, 38, 34)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        img.save(stem.with_suffix(".png"))
    if i % 7 != 6:
        stem.with_suffix(".txt").write_text(f"a {colour} {shape} number {i}\n")
    if i % 3 != 2:  # a third without sound; rates differ on purpose
        rate = 16000 if i % 2 else 11025
        t = np.arange(int(rate * 0.4)) / rate
        soundfile.write(stem.with_suffix(".wav"), 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t), rate)


def _train(rank: int, world: int, cfg) -> int:
    from pretrain.trainer import build_trainer

    trainer = build_trainer(cfg)
    trainer.fit()
    return trainer.step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("use")
    files = root / "files"
    files.mkdir()
    for i in range(60):
        _write_record(files, i)
    built = run_cli(
        "data", "build", "--source", "folder", "--input", str(files), "--out", str(root / "data"),
        "--shard-size", "10", "--split-fractions", "1,0,0",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    cfg = tiny_config(
        root / "data" / "train",
        root / "run",
        data={"batch_size": 8, "image_size": 32, "max_text_len": 12},
        train={"steps": 4, "zero_stage": 2, "warmup_steps": 1, "ckpt_every": 0},
        calibration={"method": "calmrl", "warmup_steps": 1, "latent_dim": 4},
    )
    (step,) = run_distributed(_train, 1, root / "dist", cfg)
    assert step == 4
    return {"root": root, "files": files, "run": root / "run", "split": root / "data" / "train"}


def _record_inputs(files: Path, stems: list[str]) -> tuple[list, list, list]:
    images, texts, audio = [], [], []
    for stem in stems:
        png, txt, wav = (files / f"{stem}.{e}" for e in ("png", "txt", "wav"))
        images.append(str(png) if png.exists() else None)
        texts.append(txt.read_text().strip() if txt.exists() else None)
        audio.append(str(wav) if wav.exists() else None)
    return images, texts, audio


def test_export_round_trip_equals_checkpoint(trained, tmp_path):
    run = RunDir(trained["run"])
    _, model, _ = run.load_model()
    out = export_run(trained["run"], tmp_path / "export")
    _, exported, completion, _, manifest = load_export(out)
    reference = model.state_dict()
    for name, value in exported.state_dict().items():
        assert torch.equal(value, reference[name]), name
    calibrator = run.load_completion().calibrator
    assert completion.calibrator is not None and calibrator is not None
    assert torch.equal(completion.calibrator.W, calibrator.W)
    assert manifest["completion"] == "calmrl" and manifest["checkpoint"] == "step_00000004"
    # the same inputs through the export and through the checkpoint: the same embeddings
    inputs = _record_inputs(trained["files"], [f"rec{i:02d}" for i in range(12)])
    a = Encoder.load(out).encode(*inputs, complete=True)
    b = Encoder.load(trained["run"]).encode(*inputs, complete=True)
    for m in MODALITIES:
        torch.testing.assert_close(a.emb[m], b.emb[m], rtol=0, atol=1e-6)
    # bf16 on request: half the size, embeddings within bf16 rounding
    half = export_run(trained["run"], tmp_path / "export-bf16", dtype="bf16")
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(out)
    c = Encoder.load(half).encode(*inputs, complete=True)
    for m in MODALITIES:
        assert float((c.emb[m] - b.emb[m]).abs().max()) < 0.05
    # re-exporting over an export replaces it whole; a damaged file is refused by name
    export_run(trained["run"], out)
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(ExportError, match="tokenizer.json does not match its SHA-256"):
        Encoder.load(out)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not a calmrl export"):
        export_run(trained["run"], tmp_path / "busy")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_encode_equals_training_forward_and_completion(trained):
    run = RunDir(trained["run"])
    cfg, model, _ = run.load_model()
    batch = next(iterate_split(cfg.data, trained["split"], 24))
    keys = [k for k in batch["key"] if k]
    assert len(keys) == 24
    with torch.no_grad():
        forward = model(batch)["emb"]
    encoder = Encoder.load(trained["run"])
    images, texts, audio = _record_inputs(trained["files"], keys)
    out = encoder.encode(images, texts, audio, complete=True, batch_size=10)
    assert torch.equal(out.observed, batch["present"])
    for j, m in enumerate(MODALITIES):
        rows = batch["present"][:, j]
        torch.testing.assert_close(out.emb[m][rows], forward[m][rows], rtol=0, atol=1e-5)
    # completion at inference = the imputation training's step B aligns (same state, same posterior)
    completion = run.load_completion()
    training = completion.complete({m: e.clone() for m, e in forward.items()}, batch["present"], step=10**6)
    imputed = out.imputed
    assert bool(imputed.any()) and torch.equal(imputed, ~batch["present"] & batch["present"].any(1, keepdim=True))
    for j, m in enumerate(MODALITIES):
        rows = imputed[:, j]
        torch.testing.assert_close(out.emb[m][rows], training.emb[m][rows].float(), rtol=0, atol=1e-5)
        assert torch.all(out.variance[m][~rows] == 0)
    # the predictive variance is tr(W V W^T)/d + sigma2 of the row's observed set
    row = int(imputed[:, 2].nonzero()[0, 0])
    assert completion.calibrator is not None
    cov = completion.calibrator.predictive_cov(batch["present"][row], "audio")
    assert math.isclose(float(out.variance["audio"][row]), float(cov.diagonal().mean()), rel_tol=1e-4)


def test_encode_inputs_as_users_have_them(trained):
    encoder = Encoder.load(trained["run"])
    png, wav = trained["files"] / "rec00.png", trained["files"] / "rec01.wav"
    wave, rate = soundfile.read(wav, dtype="float32")
    by_path = encoder.encode(images=[str(png)], audio=[str(wav)])
    as_objects = encoder.encode(images=[Image.open(png)], audio=[(wave, rate)])
    torch.testing.assert_close(by_path.emb["image"], as_objects.emb["image"], rtol=0, atol=1e-6)
    torch.testing.assert_close(by_path.emb["audio"], as_objects.emb["audio"], rtol=0, atol=1e-4)
    stereo = encoder.encode(audio=[(np.stack([wave, wave], 1), rate)])
    torch.testing.assert_close(stereo.emb["audio"], as_objects.emb["audio"], rtol=0, atol=1e-4)
    assert torch.equal(by_path.observed, torch.tensor([[True, False, True]]))
    with pytest.raises(InputError, match="input 1: no usable modality"):
        encoder.encode(texts=["a red circle", None])
    with pytest.raises(InputError, match="input 0: image file .*nowhere.png not found"):
        encoder.encode(images=["/nowhere.png"])
    bad = trained["root"] / "bad.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(InputError, match="image does not decode"):
        encoder.encode(images=[str(bad)])
    with pytest.raises(ValueError, match="different lengths"):
        encoder.encode(images=[str(png)], texts=["a", "b"])
    with pytest.raises(ModelLoadError, match="neither a calmrl run folder"):
        Encoder.load(trained["files"])
    with pytest.raises(ModelLoadError, match="no such model"):
        Encoder.load(trained["root"] / "missing")


def test_embed_cli_writes_parquet(trained, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for i in range(10):
        _write_record(files, i)
    (files / "broken.png").write_bytes(b"\x89PNG broken")
    (files / "blank.txt").write_text("   \n")  # an empty caption and nothing else: no usable modality
    out = tmp_path / "vectors.parquet"
    done = run_cli("embed", str(trained["run"]), "--input", str(files), "--out", str(out), "--complete")
    assert done.returncode == 0, done.stderr
    assert "embedded 10 records" in done.stdout and "2 bad records" in done.stdout
    assert "bad record broken: " in done.stderr and "image does not decode" in done.stderr
    assert "bad record blank: " in done.stderr
    vectors = read_vectors(out)
    assert set(vectors.meta["bad"]) == {"broken", "blank"}
    stems = [f"rec{i:02d}" for i in range(10)]
    reference = Encoder.load(trained["run"]).encode(*_record_inputs(files, stems), complete=True)
    assert len(vectors) == 3 * 10  # every record has at least two modalities here: all three after completion
    for row in range(len(vectors)):
        i, j = stems.index(vectors.key[row]), MODALITIES.index(vectors.modality[row])
        assert bool(vectors.observed[row]) == bool(reference.observed[i, j])
        np.testing.assert_allclose(vectors.vectors[row], reference.emb[vectors.modality[row]][i].numpy(), atol=1e-5)
        assert (vectors.thumbnail[row] is not None) == (files / f"{vectors.key[row]}.png").exists()
    # a shard split goes through the training decoder: the same vectors for the same records
    from_split = tmp_path / "split.parquet"
    done = run_cli("embed", str(trained["run"]), "--input", str(trained["split"]), "--out", str(from_split))
    assert done.returncode == 0, done.stderr
    split_vectors = read_vectors(from_split)
    assert int(split_vectors.observed.sum()) == len(split_vectors) > 100
    # errors: one line, exit 2, no traceback
    for args, message in [
        (["embed", str(trained["files"]), "--input", str(files), "--out", str(out)], "neither a calmrl run folder"),
        (
            ["embed", str(trained["run"]), "--input", str(tmp_path / "nope"), "--out", str(out)],
            "no such file or folder",
        ),
        (["export", str(tmp_path), "--out", str(tmp_path / "e")], "is not a calmrl run folder"),
    ]:
        failed = run_cli(*args)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr, failed.stderr


def test_search_cli_end_to_end(trained, tmp_path):
    """embed a folder, then `calmrl search` with a text query: the hits are the brute-force
    nearest image rows of the query's embedding; --complete searches the imputed image."""
    files = tmp_path / "files"
    files.mkdir()
    for i in range(12):
        _write_record(files, i)
    vectors_file = tmp_path / "v.parquet"
    done = run_cli("embed", str(trained["run"]), "--input", str(files), "--out", str(vectors_file), "--complete")
    assert done.returncode == 0, done.stderr
    vectors = read_vectors(vectors_file)
    images = (vectors.modality == "image") & vectors.observed
    encoder = Encoder.load(trained["run"])
    for complete in (False, True):
        query = encoder.encode(texts=["a red circle"], complete=complete)
        q = (query.emb["image"] if complete else query.emb["text"])[0].numpy()
        scores = vectors.vectors[images] @ q
        expected = [vectors.key[images][i] for i in np.argsort(-scores, kind="stable")[:3]]
        html = tmp_path / f"hits-{complete}.html"
        found = run_cli(
            "search", str(trained["run"]), "--index", str(vectors_file), "--query", "a red circle",
            "--modality", "image", "--k", "3", "--html", str(html), *(["--complete"] if complete else []),
        )  # fmt: skip
        assert found.returncode == 0, found.stderr
        ranked = [line.split()[2] for line in found.stdout.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
        assert ranked == expected, found.stdout
        assert all(key in html.read_text() for key in expected)
    failed = run_cli("search", str(trained["run"]), "--index", str(tmp_path / "none.parquet"), "--query", "x")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
