"""``python -m optimlab.report <sweep dir>``: ``optimlab-report`` without the installed script."""

import sys

from optimlab.report import main

if __name__ == "__main__":
    sys.exit(main())
