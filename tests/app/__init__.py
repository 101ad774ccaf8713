"""Tests of gateway/app/."""
