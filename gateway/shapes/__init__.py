"""External shapes as msgspec Structs: the bodies Didomi's webhooks post, and their words."""
