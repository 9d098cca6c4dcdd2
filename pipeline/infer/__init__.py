"""Chips into detections: the predictor actor, INT8 gate, seam merge, one scene's rows."""
