"""Example projects that use fleetworks as a library (not installed with it)."""
