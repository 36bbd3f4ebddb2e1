"""The embeddings file: written whole, read back equal, and refused when it is not one."""

from __future__ import annotations

import numpy as np
import pytest

from evals.vector_file import VectorFileError, VectorFileWriter, VectorRows, file_meta, read_vectors


def test_round_trip_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 8)).astype(np.float32)
    rows = VectorRows()
    for i, v in enumerate(vecs):
        rows.add(
            f"k{i}",
            ("image", "text", "audio")[i % 3],
            i % 2 == 0,
            v,
            None if i % 2 == 0 else 0.25,
            source=f"/x/{i}.png",
            caption="a cat" if i == 1 else None,
            thumbnail=b"png" if i == 2 else None,
        )
    path = tmp_path / "e.parquet"
    writer = VectorFileWriter(path, 8, {"model": "m"})
    writer.write(rows)
    writer.close({"counts": {"records": 5}})
    assert not (tmp_path / "e.parquet.tmp").exists()
    got = read_vectors(path)
    np.testing.assert_array_equal(got.vectors, vecs)
    assert list(got.key) == [f"k{i}" for i in range(5)]
    assert list(got.observed) == [True, False, True, False, True]
    assert np.isnan(got.variance[0]) and got.variance[1] == pytest.approx(0.25)
    assert got.caption[1] == "a cat" and got.thumbnail[2] == b"png" and got.source[4] == "/x/4.png"
    meta = file_meta(path)
    assert meta["model"] == "m" and meta["dim"] == 8 and meta["counts"] == {"records": 5}


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "e.parquet"
    rows = VectorRows()
    rows.add("k", "image", True, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="dimension 8"), VectorFileWriter(path, 8) as writer:
        writer.write(rows)
    assert list(tmp_path.iterdir()) == []


def test_not_an_embeddings_file(tmp_path):
    with pytest.raises(VectorFileError, match="no such embeddings file"):
        file_meta(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(VectorFileError, match="not a Parquet file"):
        read_vectors(junk)
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), other)
    with pytest.raises(VectorFileError, match="not a calmrl embeddings file"):
        read_vectors(other)
    with pytest.raises(ValueError, match="modality"):
        VectorRows().add("k", "video", True, np.zeros(2))
