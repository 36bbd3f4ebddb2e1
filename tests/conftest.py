import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# DeepSpeed compiles its CPU comm op once; keep the build between tests and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic shard set shared by the tests (train split: 8 shards)."""
    from data_pipeline.synthetic import SyntheticSpec, build_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    build_synthetic(out, SyntheticSpec(num_samples=1000, shard_size=100, seed=0), progress=False)
    return out
