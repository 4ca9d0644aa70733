"""The demo behind `main.py -input ...` (see `flow`): an example of the library in use, kept
apart from it. It needs nothing beyond the package's own dependencies (Prefect), so it has
no extra of its own.
"""
