"""``python -m spatten_compiler`` is the same as the ``spattenc`` command."""

from __future__ import annotations

import sys

from spatten_compiler.cli import main

if __name__ == "__main__":
    sys.exit(main())
