"""``python -m verimed.cli ...``: the ``verimed`` launcher without the installed script.

    python -m verimed.cli eval healthbench --grader rules --limit 2
"""
import sys

from verimed.cli import main

if __name__ == "__main__":  # vLLM's engine processes re-import __main__: keep the guard
    sys.exit(main())
