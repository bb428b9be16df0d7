"""sshfwup: zero-downtime A/B firmware updates over SSH for embedded Linux devices."""

__version__ = "0.1.0"
