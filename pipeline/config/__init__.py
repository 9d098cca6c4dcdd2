"""Job configuration: the job models, loading, overrides, checks and the job hash."""
