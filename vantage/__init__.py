"""Vantage: is this site down for everyone, in some regions, or just from here?

This package holds what the agent, the coordinator and the CLI share: the check specs,
result values, wire conversions, logging and the ``vantage`` command.
"""

__version__ = "0.1.0"
