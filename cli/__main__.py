"""`python -m cli` runs the diffbank CLI."""

import sys

from cli import main

sys.exit(main())
