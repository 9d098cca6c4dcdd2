"""Training: labelled chips, augmentation, anchor fitting, the Ray Train driver and loop."""
