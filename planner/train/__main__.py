"""``python -m planner.train PLAN_DIR ...``: what launch.sh and `memplan launch` run on every rank."""

import sys

from planner.train.run import main

sys.exit(main(sys.argv[1:]))
