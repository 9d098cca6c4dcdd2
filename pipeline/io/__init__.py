"""Reading the world: input patterns and scene ids, STAC, object storage, rasters, labels."""
