"""``python -m verimed.cli ...`` = ``verimed ...`` (the tests and ``ray job submit`` use this form)."""
import sys

from verimed.cli import main

if __name__ == "__main__":  # vLLM's engine processes re-import __main__: keep the guard
    sys.exit(main())
