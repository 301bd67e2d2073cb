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
    """A worker process (a tensor-parallel rank or a data-parallel replica) died, hung, or
    raised where the workers cannot go on (at startup, from a collective, or with another
    rank left inside the step). Every worker has been stopped; the engine cannot run
    further steps."""


class StepError(TessellmError):
    """A tensor-parallel rank raised while running a step, with an exception that could not
    be sent back as itself; the message names its type. The workers are still running and
    in step with each other: the request(s) to blame fail, the engine goes on."""


class EngineSleepingError(TessellmError):
    """The engine is asleep (``sleep``): its memory is given back until ``wake_up``. A
    request sent meanwhile is refused with this (a 503 from the server)."""
