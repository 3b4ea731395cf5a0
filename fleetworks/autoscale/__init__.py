"""Worker pools sized by queue depth: the probe, the policy, and the two
places the policy runs (a worker's own pool, and Kubernetes through KEDA)."""
