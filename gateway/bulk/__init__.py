"""Bulk: backfill and reconcile, reading Didomi's users from sources, beside both directions."""
