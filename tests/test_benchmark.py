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


def _dead(pid):
    """Whether process ``pid`` has ended (gone, or a zombie that nobody reaped yet)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except FileNotFoundError:
        return True


def test_run_process_group_kills_the_children_of_a_timed_out_command(tmp_path):
    """A launcher's child (torchrun's worker) must not outlive the launcher's timeout: the child writes its pid
    and would sleep a minute; after the timeout it is gone (polled, no fixed sleep)."""
    import time

    import pytest

    from nl_plugin.utils import run_process_group
    if not os.path.isdir('/proc/self'):
        pytest.skip('needs /proc to see whether the child still runs')
    pid_file = tmp_path / 'child_pid'
    child = f'import os, time; open({str(pid_file)!r} + ".tmp", "w").write(str(os.getpid())); ' \
            f'os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r}); time.sleep(60)'
    launcher = (f'import os, subprocess, sys, time; subprocess.Popen([sys.executable, "-c", {child!r}])\n'
                f'while not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\n'
                'time.sleep(60)')
    with pytest.raises(subprocess.TimeoutExpired):
        run_process_group([sys.executable, '-c', launcher], timeout=5)
    assert pid_file.exists(), 'the child had not started when the timeout expired'
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while not _dead(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _dead(pid), f'child {pid} outlived its launcher\'s timeout'
    done = run_process_group([sys.executable, '-c', 'print(7)'], stdout=subprocess.PIPE, text=True)
    assert done.returncode == 0 and done.stdout.strip() == '7'


def test_cpuinfo_field_reads_the_first_processor(tmp_path):
    from nl_plugin.utils import cpuinfo_field
    path = tmp_path / 'cpuinfo'
    path.write_text('processor\t: 0\nmodel name\t: CPU A\nflags\t\t: fpu avx512_bf16\n\n'
                    'processor\t: 1\nmodel name\t: CPU B\n')
    assert cpuinfo_field('model name', str(path)) == 'CPU A'
    assert cpuinfo_field('flags', str(path)).split() == ['fpu', 'avx512_bf16']
    assert cpuinfo_field('bogus', str(path)) is None
    assert cpuinfo_field('flags', str(tmp_path / 'missing')) is None
