"""Pure functions: (resource, plan) -> Kubernetes manifests (dicts). No API calls, no kopf."""
