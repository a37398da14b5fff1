"""`python -m fastdiff.report RESULTS_DIR`: see fastdiff.report."""
import sys

from fastdiff.errors import run_cli
from fastdiff.report import main

sys.exit(run_cli(main))
