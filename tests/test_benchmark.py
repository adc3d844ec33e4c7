"""The benchmark's command line runs a case in a worker process and writes the figures it printed as JSON.

Nothing here is timed: speed is read from the benchmark's own output, never asserted in a test.
"""
import json
import os
import subprocess
import sys

from nl_plugin.benchmark.runner import CASES

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'benchmark.py')


def test_every_case_has_a_description_and_builder():
    for name, (description, build) in CASES.items():
        assert description and callable(build), name


def test_command_line_writes_json(tmp_path):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, SCRIPT, '--quick', '--repeats', '1', '--only', 'matmul',
                        '--json', str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    (row, ) = data['results']
    assert row['case'] == 'matmul_fp32' and row['runs'] == 1 and row['median_s'] > 0 and row['gflops'] > 0
    assert 'matmul_fp32' in r.stdout


def test_network_cases_have_bf16_twins_and_same_run_ratios():
    from nl_plugin.benchmark.runner import ratios
    names = list(CASES)
    for case in ('nlrn_window_481x321', 'nlrn_window_1024x768', 'n3net_481x321', 'n3net_1024x768',
                 'train_iter_nlrn', 'train_iter_n3net'):
        assert names.index(f'{case}_bf16') == names.index(case) + 1     # run right after the fp32 case
    rows = [{'case': 'n3net_481x321', 'median_s': 3.0}, {'case': 'n3net_481x321_bf16', 'median_s': 1.2}]
    assert ('n3net_481x321: fp32 / bf16 time', 2.5) in ratios(rows)


def test_case_timeout_reports_the_case_and_keeps_the_json(tmp_path):
    """A case past ``--case_timeout`` becomes an error row; the JSON written after each case holds it."""
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, SCRIPT, '--quick', '--repeats', '1', '--only', 'matmul',
                        '--case_timeout', '0.01', '--json', str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (row, ) = json.loads(out.read_text())['results']
    assert row['case'] == 'matmul_fp32' and row['error'] == 'timeout after 0 s'


def test_run_process_group_kills_the_children_of_a_timed_out_command(tmp_path):
    """A launcher's child (torchrun's worker) must not outlive the launcher's timeout."""
    import time

    import pytest

    from nl_plugin.utils import run_process_group
    spawned, marker = tmp_path / 'spawned', tmp_path / 'child_alive'
    child = f'import time; time.sleep(4); open({str(marker)!r}, "w").close()'
    launcher = (f'import subprocess, sys, time; subprocess.Popen([sys.executable, "-c", {child!r}]); '
                f'open({str(spawned)!r}, "w").close(); time.sleep(60)')
    with pytest.raises(subprocess.TimeoutExpired):
        run_process_group([sys.executable, '-c', launcher], timeout=3)
    assert spawned.exists()          # the child was started before the timeout
    time.sleep(3)                    # it would have written its marker by now
    assert not marker.exists()
    done = run_process_group([sys.executable, '-c', 'print(7)'], stdout=subprocess.PIPE, text=True)
    assert done.returncode == 0 and done.stdout.strip() == '7'
