"""`python -m flashcomm.cli` is the `flashcomm` command."""

import sys

from flashcomm.cli import main

sys.exit(main())
