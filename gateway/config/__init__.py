"""`gateway.toml`: the config Structs, the TOML loader with line positions, the checks."""
