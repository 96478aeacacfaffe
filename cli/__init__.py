"""vaultflow: backups whose every step is a Prefect task."""

__version__ = "0.1.0"
