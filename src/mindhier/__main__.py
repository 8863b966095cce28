"""`python -m mindhier ...` (also what `torchrun -m mindhier ...` runs)."""

import sys

from mindhier.cli import main

sys.exit(main())
