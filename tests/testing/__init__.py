"""Tests of gateway/testing/."""
