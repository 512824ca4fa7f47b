"""The coordinator: public REST API, migrations, the `migrator` CLI. Never touches volume data."""

__version__ = "0.1.0"
