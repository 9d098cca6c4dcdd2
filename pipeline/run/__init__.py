"""A run on Ray: Ray helpers, the streaming job graph, the driver's scene book, Ray Jobs."""
