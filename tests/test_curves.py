"""Training curves from BasicSR logs (validation iterations inferred, resumed runs) and the plot_curves command."""

import cv2
import pytest

from nl_plugin.analysis.commands import plot_curves
from nl_plugin.analysis.curves import parse_train_log

HEAD = """2025-01-01 10:00:00,000 INFO:
  name: run
  val:[
    val_freq: 50
    save_img: False
  ]
"""


def _train(it, loss, lr='1.000e-03'):
    return (f'2025-01-01 10:00:01,000 INFO: [run..][epoch:  0, iter:{it:8,d}, lr:({lr},)] '
            f'[eta: 0:00:01, time (data): 0.100 (0.001)] l_pix: {loss:.4e} l_percep: {loss / 2:.4e} \n')


def _val(psnr, best_iter):
    return ('2025-01-01 10:00:02,000 INFO: Validation set5\n'
            f'\t # psnr: {psnr:.4f}\tBest: {psnr:.4f} @ {best_iter} iter\n'
            f'\t # ssim: 0.5000\tBest: 0.5000 @ {best_iter} iter\n\n')


def test_log_parsing_with_sparse_prints_and_a_resumed_run(tmp_path):
    exp = tmp_path / 'run'
    exp.mkdir()
    # print_freq 100 > val_freq 50: the validation at 50 comes before any training line
    (exp / 'train_run_20250101_100000.log').write_text(
        HEAD + '2025-01-01 10:00:00,500 INFO: Start training from epoch: 0, iter: 0\n' + _val(20.0, 50)
        + _train(100, 0.2) + _val(21.0, 100) + _train(1000, 0.1))
    # resumed from 100 (the state of iteration 1000 was not saved): 100.. logged again, later values win
    (exp / 'train_run_20250101_110000.log').write_text(
        HEAD + '2025-01-01 11:00:00,500 INFO: Resuming training from epoch: 0, iter: 100.\n' + _val(21.5, 150)
        + _train(200, 0.15, '5.000e-04') + _val(22.0, 200)
        + '2025-01-01 11:00:05,000 INFO: End of training. Time consumed: 0:00:05\n' + _val(22.0, 201))
    curves = parse_train_log(str(exp))
    assert curves['metric']['set5/psnr'] == [(50, 20.0), (100, 21.0), (150, 21.5), (200, 22.0)]
    assert [it for it, _ in curves['metric']['set5/ssim']] == [50, 100, 150, 200]
    assert curves['loss']['l_pix'] == [(100, 0.2), (200, 0.15), (1000, 0.1)]
    assert curves['loss']['l_percep'][0] == (100, 0.1)
    assert curves['lr'][1] == (200, 5e-4)


def test_plot_curves_script_writes_pngs(tmp_path):
    pytest.importorskip('matplotlib')
    log = tmp_path / 'train_run.log'
    log.write_text(HEAD + _train(50, 0.3) + _val(20.0, 50) + _train(100, 0.2) + _val(21.0, 100))
    curves, written = plot_curves([str(log), '--out', str(tmp_path / 'curves')])
    assert sorted(written) == ['loss.png', 'psnr.png', 'ssim.png']
    for name in written:
        assert cv2.imread(str(tmp_path / 'curves' / name)).shape == (400, 640, 3)
    with pytest.raises(SystemExit):
        plot_curves([])
