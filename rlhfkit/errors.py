"""The one exception type for bad user input.

Anything the user can fix (a malformed file, an unknown option value, a model directory of
the wrong kind) raises `RlhfkitError`; the CLI prints its message on one line and exits 2.
Bugs stay ordinary exceptions so they keep their tracebacks.
"""


class RlhfkitError(Exception):
    """Bad input: the message says what is wrong and, where possible, what to do."""

    exit_code = 2


class TrainingDiverged(RlhfkitError):
    """A loss or reward became NaN/inf; the last good checkpoint is kept."""

    exit_code = 3
