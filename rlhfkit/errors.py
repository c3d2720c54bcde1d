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


class EnvironmentFailure(RlhfkitError):
    """The system refused an operation (disk full, permission denied, read-only filesystem):
    nothing is wrong with the input, so the exit status is 1, not 2."""

    exit_code = 1


def os_error_message(err: OSError, path: object = None) -> str:
    """One line for an OSError: the path it concerns and the system's reason."""
    where = err.filename if err.filename is not None else path
    reason = err.strerror or str(err) or type(err).__name__
    return f"{where}: {reason}" if where is not None else reason


def output_error(err: OSError, path: object = None) -> RlhfkitError:
    """An OSError met while writing output, as a one-line error (exit 1: environmental)."""
    return EnvironmentFailure(f"cannot write {os_error_message(err, path)}")
