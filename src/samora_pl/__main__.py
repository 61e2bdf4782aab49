"""`python -m samora_pl` is the `samora` command."""

import sys

from samora_pl.cli import main

sys.exit(main())
