"""Clients the sidecar uses to talk to the model server."""
