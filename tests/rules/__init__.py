"""Tests of gateway/rules/."""
