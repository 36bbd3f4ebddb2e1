"""The errors of the data pipeline, each naming the file or sample and the fix."""

from __future__ import annotations


class DataError(RuntimeError):
    """A sample or shard that cannot be used, named with its key and shard."""
