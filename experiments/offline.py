"""No outbound traffic from anything a process starts: Flower's telemetry, update check and
runtime dependency installation, Ray's usage stats (the Makefile exports the same variables)."""

from __future__ import annotations

import os

OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def stay_offline() -> None:
    """Set the variables in this process's environment, unless the user set them."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
