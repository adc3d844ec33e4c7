"""End to end through the real ``basicsr`` command: train, auto-resume, test, torchrun (2 CPU processes).

Data: tiny images read back from a real LMDB made by scripts/create_lmdb.py (``cli_workdir`` in conftest).
"""
import csv
import glob
import os
import sys

import yaml

from conftest import CLI_ARCH, basicsr_cmd, free_port, read_log, run, write_cli_opt


def test_train_then_auto_resume(cli_workdir):
    opt = write_cli_opt(cli_workdir, 'resume')
    r = run([basicsr_cmd(), 'train', '-opt', str(opt)], cli_workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = cli_workdir / 'experiments' / 'resume'
    assert (exp / 'models' / 'net_g_4.pth').is_file() and (exp / 'training_states' / '4.state').is_file()
    log = read_log(exp)
    assert 'Validation tinyval' in log and '# psnr:' in log

    # continue to iteration 6 from the saved state, on the CPU
    r = run([basicsr_cmd(), 'train', '-opt', str(opt), '--auto_resume', '--force_yml', 'train:total_iter=6'],
            cli_workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(exp)
    assert 'Resuming training from epoch' in log and 'iter: 4.' in log
    assert (exp / 'models' / 'net_g_6.pth').is_file()
    assert not glob.glob(str(cli_workdir / 'experiments' / 'resume_archived_*'))


def test_test_command_writes_per_image_csv(cli_workdir):
    opt = write_cli_opt(cli_workdir, 'fortest', total_iter=2)
    assert run([basicsr_cmd(), 'train', '-opt', str(opt)], cli_workdir).returncode == 0
    weights = cli_workdir / 'experiments' / 'fortest' / 'models' / 'net_g_latest.pth'
    test_opt = {
        'name': 'tested', 'model_type': 'RestorationModel', 'num_gpu': 'auto', 'manual_seed': 0,
        'datasets': {'test_1': {'name': 'tinyval', 'type': 'SyntheticNoiseDataset',
                                'dataroot_gt': str(cli_workdir / 'val'), 'sigma': 25}},
        'network_g': dict(CLI_ARCH),
        'path': {'pretrain_network_g': str(weights), 'strict_load_g': True},
        'val': {'save_img': True, 'suffix': 'out', 'self_ensemble': True,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
                            'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}}},
    }
    path = cli_workdir / 'test.yml'
    path.write_text(yaml.safe_dump(test_opt))
    r = run([sys.executable, '-m', 'nl_plugin.test', '-opt', str(path)], cli_workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(cli_workdir / 'results' / 'tested' / 'tinyval_metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['image'] for r in rows] == ['img0', 'img1', 'img2', 'MEAN']
    for row in rows:
        assert 5 < float(row['psnr']) < 60 and 0 < float(row['ssim']) <= 1 and 15 < float(row['psnr_input']) < 25
    assert (cli_workdir / 'results' / 'tested' / 'visualization' / 'tinyval' / 'img1_out.png').is_file()


def test_bad_option_fails_before_touching_previous_run(cli_workdir):
    opt = write_cli_opt(cli_workdir, 'keep', total_iter=2)
    assert run([basicsr_cmd(), 'train', '-opt', str(opt)], cli_workdir).returncode == 0
    bad = write_cli_opt(cli_workdir, 'keep', total_iter=2, network_g=dict(CLI_ARCH, num_feats=4))
    r = run([basicsr_cmd(), 'train', '-opt', str(bad)], cli_workdir)
    assert r.returncode != 0 and "unknown option key(s) ['num_feats']" in r.stderr
    assert (cli_workdir / 'experiments' / 'keep' / 'models' / 'net_g_2.pth').is_file()
    assert not glob.glob(str(cli_workdir / 'experiments' / 'keep_archived_*'))
    missing = write_cli_opt(cli_workdir, 'keep', total_iter=2)
    text = missing.read_text().replace(str(cli_workdir / 'val.lmdb'), str(cli_workdir / 'nowhere'))
    missing.write_text(text)
    r = run([basicsr_cmd(), 'train', '-opt', str(missing)], cli_workdir)
    assert r.returncode != 0 and 'datasets:val' in r.stderr and 'nowhere' in r.stderr


def test_torchrun_two_cpu_processes(cli_workdir):
    opt = write_cli_opt(cli_workdir, 'ddp', total_iter=4, dist_backend='gloo')
    cmd = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
           f'--master_port={free_port()}', basicsr_cmd(), 'train', '-opt', str(opt), '--launcher', 'pytorch']
    r = run(cmd, cli_workdir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    exp = cli_workdir / 'experiments' / 'ddp'
    log = read_log(exp)
    assert 'World size (gpu number): 2' in log and 'Final weights of all 2 ranks are equal' in log
    assert log.count('Validation tinyval') >= 2  # at iter 2 and 4 (and the final one)
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
