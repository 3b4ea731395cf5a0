"""Settings of this deployment: the typed ``FLEET_*`` object from the runtime."""

from __future__ import annotations

from fleetworks.settings import Settings, get_settings, redact

__all__ = ["Settings", "get_settings", "redact", "settings"]

settings: Settings = get_settings()
