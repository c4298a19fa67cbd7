"""`python -m mpm.cli ...` (how accelerate and torchrun launch the recipes)."""

import sys

from mpm.cli import main

sys.exit(main())
