"""Data: shard reading, sample decoding, batch streams for pre-training and tasks, the synthetic world, converters."""
