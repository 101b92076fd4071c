"""Resuming a run whose init changed the base, under two processes: every process restores the recorded base
offsets, or, when the record is on some processes' disks only, every process refuses with what to do (before,
process 0 restored them and process 1 trained on the unchanged base)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("resume_worker.py")


def test_resume_restores_on_every_process_or_refuses_on_every_process(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(root)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    done = subprocess.run([*cmd, str(WORKER), str(tmp_path)], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for s in said:
        assert "base offsets of" in s["everywhere"] and "layers restored" in s["everywhere"]
        assert s["on_zero"].startswith("raised: ") and "on some processes' disks and not on others'" in s["on_zero"]
