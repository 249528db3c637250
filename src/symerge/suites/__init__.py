"""Offline benchmark suites on real pretrained weights and packaged data."""
