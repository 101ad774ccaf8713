"""What both directions share: a peer's answer, the retry policy, pacing, health, the worker."""
