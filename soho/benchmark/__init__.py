"""Measurements behind ``tools/benchmark.py``: where a training step spends its time, how fast the
data pipeline and the retrieval protocols are, and what the training framework costs over a bare loop."""
