"""Exceptions users and plugin authors can catch. Each carries a message fit to show as is."""


class TessellmError(Exception):
    """Base class of every error tessellm raises on purpose."""


class PluginError(TessellmError):
    """A plugin is missing, cannot be imported, or registered something unusable."""


class ModelLoadError(TessellmError):
    """A model could not be found, fetched or read."""


class InvalidRequestError(TessellmError, ValueError):
    """A request's prompt or sampling parameters are invalid; other requests are unaffected."""


class ConfigError(TessellmError, ValueError):
    """Engine arguments that cannot work together or with this machine."""


class WorkerError(TessellmError):
    """A worker process (a tensor-parallel rank or a data-parallel replica) raised, died or
    hung. Every worker has been stopped; the engine cannot run further steps."""
