"""The Vantage coordinator: agent fleet, checks, verdict engine, query API and metrics."""
