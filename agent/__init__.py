"""The Vantage agent: dials out to a coordinator, runs its assigned checks, streams results."""
