"""Shard writing, streaming reading and decoding of incomplete image/text/audio tuples."""
