"""`python -m mm_rec.integrations.lm_eval ARGS`: lm-eval's own command line, run after this package
has registered the `mmrec` model (lm-eval 0.4 has no plugin discovery)."""

import sys

from lm_eval.__main__ import cli_evaluate

import mm_rec.integrations.lm_eval  # noqa: F401  registers the mmrec model

if __name__ == "__main__":
    sys.argv[0] = "lm_eval"
    cli_evaluate()
