"""Errors the engine raises for user-fixable problems (the CLI prints them without a traceback)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the run resuming from it."""


class TrainingError(RuntimeError):
    """The run cannot start or continue as configured."""
