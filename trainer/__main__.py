"""`python -m trainer`: run one training job (see trainer/cli.py)."""

import sys

from trainer.cli import main

sys.exit(main())
