"""Turning a recipe into processes: `launcher run` (accelerate launch), `launcher slurm`, `launcher debug`."""
