"""`python -m carsvc`: the `carsvc` command.

Run from a source checkout whose compiled hot paths were never built (after
`pip install .`, which built them into site-packages), Python imports the
checkout, not the installed copy; the command then runs again as
`python -P -m carsvc` (no current directory on sys.path) so the installed copy,
with its extensions, serves.
"""

import os
import subprocess
import sys
from pathlib import Path

import carsvc
from carsvc._compat import installed_elsewhere

if not sys.flags.safe_path and installed_elsewhere(Path(carsvc.__file__).parent) is not None:
    argv = [sys.executable, "-P", "-m", "carsvc", *sys.argv[1:]]
    if os.name == "posix":
        os.execv(sys.executable, argv)
    sys.exit(subprocess.call(argv))

from carsvc.cli import main  # after the check: it may run another copy

sys.exit(main())
