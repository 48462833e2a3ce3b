"""Exit codes of the ``tolaria`` command and the error that maps to code 2."""

__all__ = ["EXIT_FAILURE", "EXIT_HALTED", "EXIT_OK", "EXIT_USAGE", "UsageError"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_HALTED = 3


class UsageError(ValueError):
    """Invalid command-line input; the CLI prints the message and exits with code 2."""
