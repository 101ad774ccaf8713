"""Tests of gateway/shapes/."""
