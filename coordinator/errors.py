"""What can stop a coordinator from running, for the command that starts it.

::

    Exception
     +-- vantage.checks.ConfigError   a config, checks or tokens file is invalid; raised by
     |                                load_config() and Coordinator(), before anything listens
     +-- ListenError                  an address cannot be bound; raised by Coordinator.run()

Both are one line, fit to print as they are. Everything else is a bug.
"""

from __future__ import annotations


class ListenError(Exception):
    """A listener could not bind its address. ``str()`` is one line naming it."""
