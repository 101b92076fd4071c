"""`python -m fisher_core` runs the `fisher-lora` command line."""

import sys

from fisher_core.cli import main

sys.exit(main())
