"""`python -m mm_rec ...` is `mmrec ...`."""

import sys

from mm_rec.cli import main

sys.exit(main())
