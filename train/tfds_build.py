"""``python -m train.tfds_build``: the command of train/data/tfds_build.py, under its old name."""

import sys

from train.data.tfds_build import main

if __name__ == "__main__":
    sys.exit(main())
