"""`calmrl search`'s core (evals/search.py) on small embeddings files, real faiss throughout:
exact results equal a numpy brute force, the approximate index's recall is measured and high
on clustered data, the saved index is reused while fresh, and each bad input is one clear error."""

from __future__ import annotations

import io
import json
import os
import wave
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main as calmrl
from evals.search import (
    SearchError,
    index_paths,
    open_index,
    parse_query,
    query_vector,
    read_display_columns,
    recall_at_k,
    search,
    text_table,
    write_html,
    write_png,
)
from evals.vector_file import VectorFileError, VectorFileWriter, VectorRows

D = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_file(path: Path, rows: list[tuple[str, str, bool, np.ndarray]], **display) -> Path:
    """rows: (key, modality, observed, vector); display: key -> dict(source=, caption=, thumbnail=)."""
    out = VectorRows()
    for key, modality, observed, vec in rows:
        out.add(key, modality, observed, vec, None if observed else 0.1, **display.get(key, {}))
    with VectorFileWriter(path, rows[0][3].shape[0], {"model": "test"}) as writer:
        writer.write(out)
        writer.close()
    return path


def mixed_file(path: Path, n: int = 60, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Image, text and audio rows in turn; every seventh row (from the fourth) imputed."""
    rng = np.random.default_rng(seed)
    vecs = unit(rng.standard_normal((n, D)))
    rows = [(f"k{i:03d}", ("image", "text", "audio")[i % 3], i % 7 != 3, vecs[i]) for i in range(n)]
    return write_file(path, rows), vecs


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    return unit(centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)) * noise / np.sqrt(dim))


def test_exact_search_equals_numpy_brute_force(tmp_path):
    path, vecs = mixed_file(tmp_path / "e.parquet")
    idx = open_index(path, "image", log=lambda _: None)
    assert idx.info.kind == "flat"
    assert open_index(path, "image", exact_below=1, log=lambda _: None).info.kind == "flat"  # 17 rows: 1 list
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["modality", "observed"]).to_pydict()
    rows = np.array([i for i, (m, o) in enumerate(zip(table["modality"], table["observed"])) if m == "image" and o])
    assert len(idx) == len(rows) > 10
    queries = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32) * 3  # not unit: scaled
    scores, got = search(idx, queries, k=7)
    ref_scores = unit(queries) @ vecs[rows].T
    order = np.argsort(-ref_scores, axis=1)[:, :7]
    np.testing.assert_array_equal(got, rows[order])
    np.testing.assert_allclose(scores, np.take_along_axis(ref_scores, order, axis=1), rtol=1e-5, atol=1e-6)
    import faiss

    assert faiss.cvar.distance_compute_blas_threshold == 4 * D - 1  # 5 queries went by BLAS, 1 does not:
    for i in range(len(queries)):  # the same neighbours either way
        np.testing.assert_array_equal(search(idx, queries[i : i + 1], 7)[1][0], got[i])
    # more than there are: the rest is -1, and hits() drops it
    scores, got = search(idx, queries[:1], k=len(rows) + 3)
    assert (got[0, len(rows) :] == -1).all()
    hits = idx.hits(scores[0], got[0])
    assert [h.rank for h in hits] == list(range(1, len(rows) + 1)) and all(h.modality == "image" for h in hits)


def test_approximate_index_reports_a_high_recall(tmp_path, capfd):
    vecs = clustered(4000, 32, 40, 0.5)
    path = write_file(tmp_path / "e.parquet", [(f"r{i}", "image", True, v) for i, v in enumerate(vecs)])
    idx = open_index(path, "image", exact_below=1000, log=lambda _: None)
    info = idx.info
    assert info.kind == "ivf" and info.nlist and info.nlist > 1 and info.nprobe
    assert info.recall is not None and info.recall >= 0.9 and info.recall_queries == 256 and info.recall_k == 10
    assert f"recall@10 {info.recall:.3f}" in info.describe()
    assert "WARNING" not in capfd.readouterr().err  # faiss's k-means got enough training points
    # the reported recall is the index's: check it on other queries against numpy
    own = np.arange(0, 4000, 40)
    _, found = search(idx, vecs[own], 11)
    truth = np.argsort(-(vecs[own] @ vecs.T), axis=1)[:, :11]
    measured = recall_at_k(truth, found, own, 10)
    assert measured >= 0.9 and abs(measured - info.recall) < 0.1


def test_recall_is_measured_not_assumed(tmp_path):
    """Uniform random vectors have no clusters: the recall falls short and a warning names the fix."""
    vecs = unit(np.random.default_rng(0).standard_normal((3000, 32)))
    path = write_file(tmp_path / "e.parquet", [(f"r{i}", "text", True, v) for i, v in enumerate(vecs)])
    lines: list[str] = []
    idx = open_index(path, "text", exact_below=1000, target_recall=0.999, log=lines.append)
    assert idx.info.recall is not None and idx.info.recall < 0.999
    assert idx.info.nlist is not None and idx.info.nprobe == idx.info.nlist // 4
    assert any("--exact-below 3001" in line for line in lines)
    assert recall_at_k(np.array([[0, 1, 2, 3]]), np.array([[0, 1, 9, 8]]), np.array([0]), 3) == pytest.approx(1 / 3)


def test_saved_index_is_reused_while_fresh_and_rebuilt_when_the_file_changes(tmp_path):
    path, _ = mixed_file(tmp_path / "e.parquet")
    first = open_index(path, "image", log=lambda _: None)
    index_file, info_file = index_paths(path, "image", False)
    assert index_file.is_file() and json.loads(info_file.read_text())["embeddings"]["size"] == path.stat().st_size
    assert not first.info.reused
    again = open_index(path, "image", log=lambda _: None)
    assert again.info.reused and again.info.index_path == str(index_file)
    q = np.ones((1, D), np.float32)
    np.testing.assert_array_equal(search(first, q, 5)[1], search(again, q, 5)[1])
    assert not open_index(path, "image", include_imputed=True, log=lambda _: None).info.reused  # its own file
    # the file changes (new vectors): rebuilt, and the results follow the new file
    path, vecs = mixed_file(path, n=600, seed=5)
    changed = open_index(path, "image", log=lambda _: None)
    assert not changed.info.reused
    _, rows = search(changed, vecs[0:1], 1)
    assert rows[0, 0] == 0
    # another kind asked for (approximate): rebuilt; a damaged index file: rebuilt, with a line
    assert open_index(path, "image", exact_below=1, log=lambda _: None).info.kind == "ivf"
    index_file.write_bytes(b"garbage")
    lines: list[str] = []
    fixed = open_index(path, "image", exact_below=1, log=lines.append)
    assert not fixed.info.reused and any("rebuilding" in line for line in lines)
    assert open_index(path, "image", exact_below=1, log=lambda _: None).info.reused
    assert not open_index(path, "image", exact_below=1, target_recall=0.5, log=lambda _: None).info.reused
    assert not open_index(path, "image", exact_below=1, target_recall=0.5, recall_k=5, log=lambda _: None).info.reused
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_include_imputed_adds_the_imputed_rows_marked(tmp_path):
    path, vecs = mixed_file(tmp_path / "e.parquet")
    observed = open_index(path, "image", log=lambda _: None)
    both = open_index(path, "image", include_imputed=True, log=lambda _: None)
    assert len(both) > len(observed)
    assert observed.observed.all() and not both.observed.all()
    imputed_row = int(both.file_rows[~both.observed][0])
    scores, rows = search(both, vecs[imputed_row : imputed_row + 1], 3)
    hits = both.hits(scores[0], rows[0])
    assert hits[0].row == imputed_row and hits[0].status == "imputed" and hits[0].variance == pytest.approx(0.1)
    assert "imputed" in text_table(hits, "h").splitlines()[2]
    _, rows = search(observed, vecs[imputed_row : imputed_row + 1], len(observed))
    assert imputed_row not in rows[0]
    assert "observed and imputed" in both.info.describe() and "observed only" in observed.info.describe()


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []
        self.imgs = 0
        self.audio: list[str] = []
        self._in_key = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._in_key = tag == "td" and a.get("class") == "key"
        self.imgs += tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,")
        if tag == "audio":
            self.audio.append(a.get("src") or "")

    def handle_data(self, data):
        if self._in_key:
            self.keys.append(data)
            self._in_key = False


def test_html_and_png_show_the_hits(tmp_path):
    wav = tmp_path / "chirp.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    vecs = unit(np.random.default_rng(0).standard_normal((4, D)))
    display = {
        "red": {"thumbnail": png((255, 0, 0)), "caption": "a red <bird>"},
        "blue": {"thumbnail": png((0, 0, 255))},
        "song": {"source": str(wav), "caption": "birdsong"},
        "shard": {"source": "s3://b/shard-0.tar#x"},
    }
    rows = [("red", "image", True, vecs[0]), ("blue", "image", True, vecs[1])]
    rows += [("song", "audio", True, vecs[2]), ("shard", "audio", True, vecs[3])]
    path = write_file(tmp_path / "e.parquet", rows, **display)
    for modality, keys in (("image", {"red", "blue"}), ("audio", {"song", "shard"})):
        idx = open_index(path, modality, log=lambda _: None)
        scores, found = search(idx, vecs[:1], 10)
        hits = idx.hits(scores[0], found[0])
        page = write_html(tmp_path / f"{modality}.html", hits, idx.info.describe(), "a red bird")
        parsed = _Cells()
        parsed.feed(page.read_text())
        assert set(parsed.keys) == keys
        if modality == "image":
            assert parsed.imgs == 2 and "a red &lt;bird&gt;" in page.read_text() and not parsed.audio
        else:
            assert parsed.audio == [wav.resolve().as_uri()]  # the shard URL is no local file
        out = write_png(tmp_path / f"{modality}.png", hits, "a red bird")
        with Image.open(out) as im:
            im.load()
            assert im.format == "PNG" and im.width > 100
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_query_vector_rules():
    e = {
        m: torch.tensor(unit(np.random.default_rng(i).standard_normal(D)))
        for i, m in enumerate(("image", "text", "audio"))
    }
    vec, how = query_vector(e, [False, True, False], None, "image", complete=False)
    np.testing.assert_allclose(vec, e["text"].numpy(), rtol=1e-6)
    assert "cross-modal" in how
    vec, how = query_vector(e, [True, True, False], None, "image", complete=True)
    np.testing.assert_allclose(vec, e["image"].numpy(), rtol=1e-6)  # its own image wins
    vec, how = query_vector(e, [False, True, False], [True, False, True], "image", complete=True)
    np.testing.assert_allclose(vec, e["image"].numpy(), rtol=1e-6)
    assert "imputed by the calibrator from the query's text" in how
    vec, _ = query_vector(e, [False, True, True], None, "image", complete=False)  # text+audio: their mean
    np.testing.assert_allclose(vec, unit(e["text"].numpy() + e["audio"].numpy()), rtol=1e-5)
    with pytest.raises(SearchError, match="no usable modality"):
        query_vector(e, [False, False, False], None, "image", complete=False)
    with pytest.raises(SearchError, match="did not impute image"):
        query_vector(e, [False, True, False], [False, False, False], "image", complete=True)


def test_query_parsing(tmp_path):
    img = tmp_path / "bird.PNG"
    img.write_bytes(png((1, 2, 3)))
    snd = tmp_path / "song.wav"
    snd.write_bytes(b"RIFF")
    txt = tmp_path / "q.txt"
    txt.write_text("a red bird\n")
    odd = tmp_path / "data.bin"
    odd.write_bytes(b"x")
    assert parse_query("a red bird").text == "a red bird"
    assert parse_query(str(img)).image == img and parse_query(str(img)).text is None
    assert parse_query(str(snd)).audio == snd and parse_query(str(txt)).text == "a red bird"
    both = parse_query("a red bird", query_image=str(img))
    assert both.text == "a red bird" and both.image == img
    assert both.describe() == f"text 'a red bird' + image {img}"
    for args, message in [
        ((str(tmp_path / "gone.jpg"),), "no such file"),
        ((str(odd),), "unknown type .bin"),
        ((None, str(tmp_path / "gone.png")), "--query-image .*: no such file"),
        ((None, None, str(img)), "not an audio file"),
        (("  ",), "text is empty"),
        ((None,), "no query"),
        ((str(img), str(img)), "both give an image"),
    ]:
        with pytest.raises(SearchError, match=message):
            parse_query(*args)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    path, _ = mixed_file(tmp_path / "e.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    only_text = write_file(
        tmp_path / "t.parquet", [("a", "text", True, unit(np.ones(D))), ("b", "image", False, unit(np.ones(D)))]
    )
    model = str(tmp_path / "no-model")  # every error below comes before the model is loaded
    cases = [
        (["--index", str(tmp_path / "none.parquet"), "--query", "x"], "no such embeddings file"),
        (["--index", str(junk), "--query", "x"], "not a Parquet file"),
        (["--index", str(path), "--query", "x", "--k", "0"], "--k 0: ask for at least one neighbour"),
        (["--index", str(path), "--query", str(tmp_path / "gone.png")], "no such file"),
        (["--index", str(path), "--query", str(junk)], "unknown type .parquet"),
        (["--index", str(only_text), "--query", "x", "--modality", "audio"], "no observed audio rows"),
        (["--index", str(only_text), "--query", "x"], "1 imputed image rows: add --include-imputed"),
    ]
    for argv, message in cases:
        assert calmrl(["search", model, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(VectorFileError):
        open_index(junk, "image")
    idx = open_index(path, "image", log=lambda _: None)
    for bad, message in [
        (np.zeros((1, D)), "zero"),
        (np.ones((1, D + 1)), "dimension"),
        (np.ones((1, D)), "at least one"),
    ]:
        with pytest.raises(SearchError, match=message):
            search(idx, bad, 0 if message == "at least one" else 3)
    assert os.listdir(tmp_path)  # nothing above removed the inputs


def test_search_help_names_the_query_rules(capsys):
    with pytest.raises(SystemExit):
        calmrl(["search", "--help"])
    out = capsys.readouterr().out
    assert "--query-image" in out and "by its suffix" in out and "calmrl search runs/demo" in out


def test_display_columns_come_from_the_right_rows_across_row_groups(tmp_path):
    path = tmp_path / "e.parquet"
    vecs = unit(np.random.default_rng(0).standard_normal((4500, 4)))
    with VectorFileWriter(path, 4) as writer:
        for start in (0, 1500, 3000):  # three row groups of 1500 (each read in batches of 1024)
            rows = VectorRows()
            for i in range(start, start + 1500):
                rows.add(f"k{i}", "text", True, vecs[i], caption=f"c{i}", source=f"s{i}")
            writer.write(rows)
        writer.close()
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).num_row_groups == 3
    wanted = [4499, 0, 1030, 1499, 1500, 2600, 1024, 1023]
    got = read_display_columns(path, wanted)
    assert {r: got[r][:2] for r in wanted} == {r: (f"s{r}", f"c{r}") for r in wanted}
