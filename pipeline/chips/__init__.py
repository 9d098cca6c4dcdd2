"""Scenes into chips: the grid, windows, chip ids, normalisation, scene plans."""
