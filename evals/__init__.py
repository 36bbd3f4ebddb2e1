"""Retrieval, zero-shot, anchor shift, imputation quality and benchmarks."""
