"""``python -m fleetworks`` is the ``fleetworks`` command."""

from fleetworks.cli import main

main()
