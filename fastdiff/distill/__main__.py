"""`python -m fastdiff.distill`: see fastdiff.distill.cli."""
import sys

from fastdiff.distill.cli import main
from fastdiff.errors import run_cli

sys.exit(run_cli(main))
