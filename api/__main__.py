"""`python -m api` runs the diffbank CLI."""

import sys

from api.cli import main

sys.exit(main())
