"""Tools around the pipeline: synthetic labelled scenes and the demo."""
