"""`python -m fastdiff` is the main job: the same as `python -m fastdiff.distill`."""
import sys

from fastdiff.distill import main
from fastdiff.errors import run_cli

sys.exit(run_cli(main))
