"""Entry point: `python main.py -input 1 2 3` (see `python main.py --help`)."""

import sys
from pathlib import Path

from juicecache.cli import main

if __name__ == "__main__":
    sys.exit(main(root=Path(__file__).resolve().parent))
