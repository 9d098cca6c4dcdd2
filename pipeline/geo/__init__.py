"""Map coordinates: box corners, ring orientation, CRS conversion (the only copies)."""
