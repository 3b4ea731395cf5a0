"""Settings of this deployment: the runtime's ``FLEET_*`` object and each agent's own."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetworks.settings import Settings, get_settings, redact


class MentionsSettings(BaseSettings):
    """``FLEET_MENTIONS_*``: the mentions agent's feed and poll."""

    model_config = SettingsConfigDict(env_prefix="FLEET_MENTIONS_", env_file=".env", extra="ignore")

    seed: int = 7
    poll_interval_s: float = Field(default=10.0, gt=0)
    per_poll: int = Field(default=20, ge=0)


class PricingSettings(BaseSettings):
    """``FLEET_PRICING_*``: the pricing agent's catalogue and cycle."""

    model_config = SettingsConfigDict(env_prefix="FLEET_PRICING_", env_file=".env", extra="ignore")

    seed: int = 11
    #: Products in the simulated catalogue; each is repriced every tick.
    products: int = Field(default=200, ge=0, le=1_000_000)
    interval_s: float = Field(default=30.0, gt=0)
    #: Largest price move per tick, as a fraction of the current price.
    max_step: float = Field(default=0.05, gt=0, le=1)
    #: A drop of the cheapest competitor's quote, from one window to the next,
    #: larger than this fraction is announced as ``competitor.price_dropped``.
    drop_alert: float = Field(default=0.05, gt=0, lt=1)


class SupportSettings(BaseSettings):
    """``FLEET_SUPPORT_*``: the support agents' escalation."""

    model_config = SettingsConfigDict(env_prefix="FLEET_SUPPORT_", env_file=".env", extra="ignore")

    #: Seconds an escalation waits for an acknowledgement before it moves on.
    ack_timeout_s: float = Field(default=900.0, gt=0)


class UploadsSettings(BaseSettings):
    """``FLEET_UPLOADS_*``: the upload scanner's folders."""

    model_config = SettingsConfigDict(env_prefix="FLEET_UPLOADS_", env_file=".env", extra="ignore")

    #: The folder ``fleetworks watch`` watches; event paths are relative to it.
    dir: Path = Path(".fleet/uploads")
    #: Where infected files are moved (outside the watched folder).
    quarantine_dir: Path = Path(".fleet/quarantine")
    #: Files larger than this are not read (verdict ``oversized``).
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)


class IotSettings(BaseSettings):
    """``FLEET_IOT_*``: the simulated IoT fleet and its regional controller."""

    model_config = SettingsConfigDict(env_prefix="FLEET_IOT_", env_file=".env", extra="ignore")

    #: Regions, each a controller group ``region:<name>``.
    regions: int = Field(default=3, ge=1, le=50)
    #: Seconds between two cycles of a region's controller.
    every_s: float = Field(default=0.5, gt=0)
    #: Setpoint commands a cycle sends (to the devices furthest from target).
    per_cycle: int = Field(default=10, ge=1, le=10_000)
    #: Seconds between two commands of a cycle (a device gateway's pace).
    send_gap_s: float = Field(default=0.02, ge=0)


settings: Settings = get_settings()
mentions = MentionsSettings()
pricing = PricingSettings()
support = SupportSettings()
uploads = UploadsSettings()
iot = IotSettings()

__all__ = [
    "IotSettings",
    "MentionsSettings",
    "PricingSettings",
    "Settings",
    "SupportSettings",
    "UploadsSettings",
    "iot",
    "mentions",
    "pricing",
    "redact",
    "settings",
    "support",
    "uploads",
]
