"""Launchers (local, SLURM, Kubernetes), sweeps and metrics."""
