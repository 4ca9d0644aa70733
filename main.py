"""Entry point: `python main.py -input 1 2 3` (see `python main.py --help`)."""

import sys
from pathlib import Path

from juicecache.cli import main
from juicecache.cli.run import end_demo_fast

if __name__ == "__main__":
    end_demo_fast()
    sys.exit(main(root=Path(__file__).resolve().parent))
