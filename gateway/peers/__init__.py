"""The two peers' REST APIs: Braze's (forward) and Didomi's Consents API (reverse)."""
