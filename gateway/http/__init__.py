"""What every route shares: app state and its typed keys, auth, JSON answers, capped reads."""
