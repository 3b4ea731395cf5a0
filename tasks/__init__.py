"""Celery bindings of the agents: one module per agent, thin."""
