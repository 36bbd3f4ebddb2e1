"""Encoders, the calibrator, alignment objectives and the DeepSpeed trainer."""
