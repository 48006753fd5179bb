"""User-facing errors: one clear sentence that the CLI prints without a traceback."""


class SilotuneError(Exception):
    """An error caused by the user's input (config, data, checkpoint, command line)."""


class ConfigError(SilotuneError):
    """The job configuration is invalid; the message names the field path and allowed values."""


class DataError(SilotuneError):
    """A data file or dataset name is missing or malformed."""


class CheckpointError(SilotuneError):
    """A checkpoint is missing, incomplete or corrupt."""


class ModelError(SilotuneError):
    """A model name, folder or preset cannot be loaded."""


class TrainingError(SilotuneError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""
