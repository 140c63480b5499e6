"""The one error of the checkpoint package."""
from ..settings import UsageError


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded; the message names the file and the problem in one line."""
