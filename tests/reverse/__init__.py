"""Tests of gateway/reverse/."""
