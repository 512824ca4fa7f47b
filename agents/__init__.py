"""The host agent: everything that touches Docker and volume bytes. Never imports `migrator`."""

__version__ = "0.1.0"
