from pathlib import Path

import pytest

from pretrain.runtime import configure_runtime

# DeepSpeed's CPU accelerator, and its comm op compiled once into the checkout's .cache.
configure_runtime()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic shard set shared by the tests (train split: 8 shards)."""
    from data_pipeline.synthetic import SyntheticSpec, build_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    build_synthetic(out, SyntheticSpec(num_samples=1000, shard_size=100, seed=0), progress=False)
    return out
