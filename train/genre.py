"""``python -m train.genre``: the command of train/data/genre.py, under its old name."""

import sys

from train.data.genre import main

if __name__ == "__main__":
    sys.exit(main())
