"""The detection table: GeoParquet rows, atomic commits, reads, compaction, vacuum, stores."""
