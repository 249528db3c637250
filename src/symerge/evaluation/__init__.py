"""Metrics and diagnostics: accuracy, normalized accuracy, calibration, cross-task matrix."""
