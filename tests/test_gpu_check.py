"""scripts/gpu_check.py: refuses to run its GPU steps without a GPU; its --smoke mode runs every step on the CPU.

The smoke run takes 3-4 minutes on a busy 2-core machine, so it is marked slow (``pytest --run-slow``);
by hand: ``python scripts/gpu_check.py /tmp/gc --smoke``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = os.path.join(ROOT, 'scripts', 'gpu_check.py')


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is visible')
def test_without_a_gpu_it_stops_and_names_smoke(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'no CUDA device is visible' in r.stderr and '--smoke' in r.stderr
    assert not os.path.exists(tmp_path / 'gpu_check.json')


@pytest.mark.slow
def test_smoke_mode_runs_every_step_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path), '--smoke'], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['smoke'] and [s['step'] for s in report['steps']] == [
        'prepare demo data', 'benchmark', 'cuda tests', 'train nlrn 2 ranks', 'test nlrn', 'triton sweep',
        'train n3net']
    assert all(s['ok'] for s in report['steps'])
    assert (tmp_path / 'experiments' / 'gpu_check_nlrn' / 'models' / 'net_g_latest.pth').is_file()
    assert (tmp_path / 'results' / 'gpu_check_nlrn_test' / 'demo_val_metrics.csv').is_file()
    assert 'matmul_fp32' in r.stdout and 'GPU check' in r.stdout
