"""Forward: Didomi's webhooks from the spool, mapped, batched per person, sent to Braze."""
