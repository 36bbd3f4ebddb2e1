"""The GPU check's CPU-side behaviour: it refuses without CUDA, counts FLOPs as a
hand count does, and finds the device's peak."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr


def test_flop_count_matches_a_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)  # the input needs no gradient: only weight gradients in layer 1

    def step():
        model(x).square().sum().backward()

    # forward: 2*5*8*16 + 2*5*16*4; backward: layer 2 input and weight gradients (2 x 2*5*16*4),
    # layer 1 weight gradient only (2*5*8*16)
    forward = 2 * 5 * 8 * 16 + 2 * 5 * 16 * 4
    backward = 2 * (2 * 5 * 16 * 4) + 2 * 5 * 8 * 16
    assert _module().count_flops(step) == forward + backward == 4480


def test_peak_lookup():
    gpu = _module()
    assert gpu.peak_tflops("NVIDIA H100 PCIe", None) == 756.0  # the longest matching name wins
    assert gpu.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert gpu.peak_tflops("Some Future GPU", None) is None
    assert gpu.peak_tflops("NVIDIA H200", 500.0) == 500.0


def test_smoke_run_goes_through_every_case(tmp_path):
    """The whole pipeline (data, four torchrun jobs, the table) on CPU with tiny towers."""
    command = [sys.executable, str(SCRIPT), "--smoke", "--steps", "8", "--batch", "8", "--workers", "0"]
    command += ["--samples", "128", "--data", str(tmp_path / "data"), "--out", str(tmp_path)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for case in ("zero0-bf16", "zero2-bf16", "zero3-bf16", "zero2-bf16-chunked", "zero2-fp32"):
        row = next(line for line in done.stdout.splitlines() if line.startswith(case))
        assert "FAILED" not in row
    assert "5/5 cases ran" in done.stdout
    # the same seed in fp32 under every ZeRO stage, chunked or not: the loss curves agree
    assert done.stdout.count("0.00%") >= 4
