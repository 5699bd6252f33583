"""`python -m mm_rec ...` is `mmrec ...`."""

from mm_rec.cli import entry_point

entry_point()
