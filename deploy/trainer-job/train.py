"""Entry point for `python deploy/trainer-job/train.py` and `accelerate launch deploy/trainer-job/train.py`
(the package beside it does the work)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instructd_job.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
