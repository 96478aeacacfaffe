"""Deployments: `vaultflow serve` turns one TOML config (config.py, example.toml) into served deployments
(serve.py) and alarms on the Prefect server (alarms.py)."""
