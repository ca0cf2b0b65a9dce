"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class DataPrepError(Exception):
    """Bad input or settings. The message names the file (where there is one) and the problem."""
