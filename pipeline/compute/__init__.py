"""Compute: the connection to Ray and the console a long run reports progress on.

A layer below inference, evaluation, training and runs, which all use it; it imports only
errors, io and retinanet."""
