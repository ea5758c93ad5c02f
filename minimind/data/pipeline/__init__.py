"""The Ray Data side of minimind's data: corpus preparation into Parquet shards and memory-mapped token arrays."""

from minimind.data.pipeline.manifest import MANIFEST_FILE, Manifest, is_prepared

__all__ = ["MANIFEST_FILE", "Manifest", "is_prepared"]
