"""Tests of gateway/forward/."""
