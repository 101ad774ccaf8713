"""Tests of gateway/peers/."""
