"""warm-sidecar: an async proxy that keeps Triton / TF Serving pods warm."""

__version__ = "0.1.0"
