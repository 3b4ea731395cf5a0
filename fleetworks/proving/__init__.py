"""The rigs that prove what fleetworks claims: demos, benchmarks and fault injection.

They are not the product: each takes the Celery app it runs on (``fleetworks
-A ...``) and starts real worker processes of that app. The probe agent
(:mod:`fleetworks.proving.probe`) is what the benchmarks and the chaos run
send; the rigs add it to the workers they start, so they run on any fleet.
"""
