"""Layered loading: models loaded and warmed in order of their share of traffic; per-model readiness."""
