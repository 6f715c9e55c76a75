"""``python -m train.speakers``: the command of train/data/speakers.py (the speakers token-classification data)."""

import sys

from train.data.speakers import main

if __name__ == "__main__":
    sys.exit(main())
