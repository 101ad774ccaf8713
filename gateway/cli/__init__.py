"""The `gateway` command; it imports `gateway.app` lazily so `--version` and `check` stay light."""
