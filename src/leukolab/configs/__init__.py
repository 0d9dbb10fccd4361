"""Packaged default configs (YAML)."""
