#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one table, under 5 minutes on one GPU. Flags pass through;
# PYTHON picks the interpreter of the environment with the CUDA build of torch.
exec "${PYTHON:-python3}" "$(dirname "$0")/../benchmarks/gpu_check.py" "$@"
