"""`python -m symerge ...` runs the CLI (the same as the `symerge` script), e.g. from a checkout on PYTHONPATH."""

import sys

from symerge.cli import main

sys.exit(main())
