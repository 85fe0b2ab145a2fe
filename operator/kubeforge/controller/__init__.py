"""The kopf operator: thin handlers (handlers.py) over pure reconcile functions."""
