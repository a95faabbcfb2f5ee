"""`python -m kfresh.cli ...` is `kfresh ...` (the harness starts servers this way, with the interpreter it runs in)."""

import sys

from kfresh.cli import main

sys.exit(main())
