"""Agent behaviours: plain Python, no Celery or Redis, testable alone."""
