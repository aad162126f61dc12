"""Benchmarks of the model host against one model per process."""
