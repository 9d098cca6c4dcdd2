"""Error hierarchy of the batch system.

Every message names the thing that is wrong (file, YAML field, scene id, chip) and
what was expected, so a user can fix it without reading a traceback.
"""


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A job file or option is invalid. The CLI exits with code 2."""


class InputError(PipelineError):
    """A scene, label file or checkpoint cannot be used (missing, corrupt, unsupported)."""


class RasterReadError(InputError):
    """A raster opened but a window could not be read (damaged tiles, I/O failure)."""


class GeoreferenceError(InputError):
    """A scene's georeferencing cannot be honoured (e.g. rotated geotransform)."""


class ClusterError(PipelineError):
    """The Ray cluster named by compute.address cannot be reached or joined."""


class CommitError(PipelineError):
    """Publishing a run's output failed; nothing of that run became visible."""


class TrainingError(PipelineError):
    """Training could not run or did not finish (the message says which worker/step)."""
