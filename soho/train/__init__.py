"""Training: the one trainer, optimizers and schedules, checkpoints, ablation sweeps."""
