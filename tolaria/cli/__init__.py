"""The ``tolaria`` command line: ``tolaria demo`` and ``tolaria report``.

Exit codes: 0 success, 1 unexpected failure, 2 invalid input (bad option, value or
path), 3 training halted by the emergency controller.
"""

from tolaria.cli.main import EXIT_FAILURE, EXIT_HALTED, EXIT_OK, EXIT_USAGE, main

__all__ = ["EXIT_FAILURE", "EXIT_HALTED", "EXIT_OK", "EXIT_USAGE", "main"]
