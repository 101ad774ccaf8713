"""Tests of gateway/spool/."""
