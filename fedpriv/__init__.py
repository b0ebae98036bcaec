"""fedpriv: privacy-preserving federated training for hospitals."""

import os as _os

# A privacy tool must not phone home: Flower's usage telemetry stays off unless a user
# explicitly turns it on (it is read when flwr is first imported).
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"

__all__ = ["__version__", "simulate"]


def __getattr__(name: str) -> object:
    # Lazy: `import fedpriv` stays cheap (no torch, no Flower) until a run is asked for.
    if name == "simulate":
        from fedpriv.server.simulation import simulate

        return simulate
    raise AttributeError(name)
