"""This deployment's own tables: what its agents write, on its own metadata.

The runtime's tables (``outcomes``, ``guard_events``, ``agent_state``, ...)
are :mod:`fleetworks.models`; these belong to the agents of this repository
and are created by the deployment's own Alembic branch (``config/migrations``),
which ``fleetworks db upgrade`` runs after the runtime's. Every effect table
has a ``fencing_token`` column (for :mod:`fleetworks.fenced`) and a UNIQUE key
on what must happen once, so a duplicate effect fails loudly.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

_ID = BigInteger().with_variant(Integer, "sqlite")

#: The mentions agent's view of each mention: processing -> responded | ignored.
MENTIONS = Table(
    "mentions",
    metadata,
    Column("mention_id", String(100), primary_key=True),
    Column("brand", String(100), nullable=False),
    Column("author", String(100), nullable=False),
    Column("text", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: The mentions agent's effect: one response per mention (UNIQUE).
RESPONSES = Table(
    "responses",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("mention_id", String(100), nullable=False, unique=True),
    Column("text", Text, nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The pricing agent's effect: one decision per product per tick (UNIQUE).
PRICE_CHANGES = Table(
    "price_changes",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("product_id", String(100), nullable=False),
    Column("tick", String(300), nullable=False),
    Column("old_cents", Integer, nullable=False),
    Column("new_cents", Integer, nullable=False),
    #: The state version this decision wrote.
    Column("version", Integer, nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("product_id", "tick", name="ux_price_changes_product_tick"),
    Index("ix_price_changes_tick", "tick"),
)

#: The support agents' view of each ticket: triaged, then escalated or not.
SUPPORT_TICKETS = Table(
    "support_tickets",
    metadata,
    Column("ticket_id", String(100), primary_key=True),
    Column("priority", String(10), nullable=False),
    Column("sentiment", Float, nullable=False),
    Column("escalated", Boolean, nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: One row per escalation attempt of a ticket (UNIQUE): who it was assigned
#: to, and who acknowledged it, or ``timed_out``.
SUPPORT_ASSIGNMENTS = Table(
    "support_assignments",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("ticket_id", String(100), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("person", String(100), nullable=False),
    #: ``assigned`` -> ``acknowledged`` | ``timed_out``.
    Column("status", String(20), nullable=False),
    Column("acknowledged_by", String(100)),
    Column("fencing_token", BigInteger, nullable=False),
    Column("assigned_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True)),
    UniqueConstraint("ticket_id", "attempt", name="ux_support_assignments_ticket_attempt"),
)

#: The price-drop alert agent's effect: one alert per announcement (UNIQUE).
PRICE_ALERTS = Table(
    "price_alerts",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("event_id", String(200), nullable=False, unique=True),
    Column("product_id", String(100), nullable=False),
    Column("tick", String(300), nullable=False),
    Column("from_cents", Integer, nullable=False),
    Column("to_cents", Integer, nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_price_alerts_tick", "tick"),
)

#: The upload scanner's effect: one verdict per file content (UNIQUE).
FILE_SCANS = Table(
    "file_scans",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("path", String(500), nullable=False),
    Column("size", BigInteger, nullable=False),
    #: clean | infected | empty | oversized
    Column("verdict", String(20), nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The simulated IoT fleet (agents/iot.py): one row per device, its telemetry
#: (``temperature``) and the last setpoint it took, with the term that sent it.
DEVICES = Table(
    "devices",
    metadata,
    Column("device_id", String(100), primary_key=True),
    Column("region", String(100), nullable=False),
    Column("setpoint", Float, nullable=False),
    Column("temperature", Float, nullable=False),
    Column("last_term", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_devices_region", "region"),
)

#: Every setpoint command a device received: its term, and whether the device
#: took it (a term lower than the highest its region has seen is refused).
DEVICE_COMMANDS = Table(
    "device_commands",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("device_id", String(100), nullable=False),
    Column("region", String(100), nullable=False),
    Column("term", BigInteger, nullable=False),
    Column("setpoint", Float, nullable=False),
    Column("accepted", Boolean, nullable=False),
    Column("sender", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_device_commands_region", "region", "id"),
)
