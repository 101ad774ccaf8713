"""Mapping rules: `mappings/*.toml` compiled into lookup tables and applied to webhooks."""
