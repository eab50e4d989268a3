"""fisherguard on Flower (``flwr``): a strategy that wraps any defense, a ClientApp running the
same client layer, a ServerApp, and a launcher for simulation and deployment (docs/flower.md).

flwr is optional (``pip install 'fisherguard[flower]'``); the core never imports it.
"""

from __future__ import annotations

import os

# fisherguard is not on a package index: installed from a clone (`make install` includes flwr)
INSTALL_HINT = "make install, or pip install torch==2.13.0 && pip install -e '.[flower]' in the clone"

# docs/flower.md §6: no telemetry, no update check, never `uv sync` an app's dependencies (that could
# pull another torch). Set before flwr is imported so every process that imports us inherits them.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class FlowerMissing(ImportError):
    """flwr is not installed; the message says how to install it."""


def require_flwr() -> None:
    """Import flwr or raise an ImportError that says how to install it."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import flwr  # noqa: F401
    except ImportError as exc:
        raise FlowerMissing(f"the Flower engine needs flwr; install it with `{INSTALL_HINT}`") from None
