"""A shop's existing Celery project that adopts fleetworks for one agent.

Its own package name, its own Celery app (``examples.shop.celery:app``), its
own table. Run a worker with ``celery -A examples.shop.celery:app worker`` or
``fleetworks -A examples.shop.celery:app worker``.
"""
