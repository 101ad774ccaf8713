"""Tests of gateway/bulk/."""
