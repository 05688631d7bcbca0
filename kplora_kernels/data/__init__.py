"""Embedded data for the demo (no downloads)."""
