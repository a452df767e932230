"""``python -m vantage`` is the ``vantage`` command."""

from .cli import main

raise SystemExit(main())
