"""Training curves (losses, validation metrics, learning rate) read from BasicSR's logs and TensorBoard events.

Both readers return the same mapping::

    {'loss': {'l_pix': [(iter, value), ...]}, 'metric': {'<dataset>/<metric>': [(iter, value), ...]},
     'lr': [(iter, value), ...]}

with iterations sorted and, where a resumed run logged an iteration again, its latest value.
"""
import glob
import math
import os
import re

_TRAIN_LINE = re.compile(r'\[epoch:\s*\d+, iter:\s*([\d,]+), lr:\(([^,)]*)')
_LOSS = re.compile(r'\b(l_\w+): (\S+)')
_VALIDATION = re.compile(r'INFO: Validation (.+?)\s*$')
_METRIC = re.compile(r'^\s*# (\w+): (\S+)')
_START = re.compile(r'(?:Start training|Resuming training) from epoch: \d+, iter: (\d+)')
_VAL_FREQ = re.compile(r'^\s*val_freq: ([0-9.eE+]+)\s*$')


def log_files(path):
    """The ``train_*.log`` files of an experiment folder (oldest first), or ``[path]`` for a file."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, 'train_*.log')))
        if not files:
            raise FileNotFoundError(f'{path}: no train_*.log in this folder')
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such log file or experiment folder')
    return [path]


def _number(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


def _finish(series):
    return sorted(series.items())


def parse_train_log(path):
    """Losses, learning rate and validation metrics of a BasicSR training log (or all logs of a folder).

    BasicSR does not write the iteration into its validation lines. A validation block is given the first
    multiple of ``val:val_freq`` (read from the option dump at the top of the log) after the previous
    validation and not before the last logged training iteration; the validation BasicSR runs after
    "End of training" gets the last training iteration.

    Args:
        path (str): A ``train_*.log`` file or an experiment folder (every ``train_*.log`` in it, in order,
            for resumed runs).

    Returns:
        dict: See the module docstring.
    """
    loss, metric, lr = {}, {}, {}
    for file in log_files(path):
        val_freq, last_iter, last_val, ended, dataset = None, 0, 0, False, None
        with open(file, encoding='utf-8', errors='replace') as f:
            for line in f:
                if val_freq is None and _VAL_FREQ.match(line):
                    val_freq = max(int(float(_VAL_FREQ.match(line).group(1))), 1)
                m = _START.search(line)
                if m:
                    last_iter = last_val = int(m.group(1))
                    continue
                m = _TRAIN_LINE.search(line)
                if m:
                    last_iter, dataset = int(m.group(1).replace(',', '')), None
                    lr[last_iter] = _number(m.group(2))
                    for name, value in _LOSS.findall(line[m.end():]):
                        loss.setdefault(name, {})[last_iter] = _number(value)
                    continue
                if 'End of training' in line:
                    ended = True
                    continue
                m = _VALIDATION.search(line)
                if m:
                    dataset = m.group(1)
                    if ended or not val_freq:
                        it = last_iter
                    else:
                        it = max(last_val + val_freq, -(-last_iter // val_freq) * val_freq)
                        last_val = it
                    continue
                m = _METRIC.match(line)
                if m and dataset is not None:
                    metric.setdefault(f'{dataset}/{m.group(1)}', {})[it] = _number(m.group(2))
    return {'loss': {k: _finish(v) for k, v in loss.items()}, 'metric': {k: _finish(v) for k, v in metric.items()},
            'lr': _finish(lr)}


def read_tensorboard(logdir):
    """The same curves from the TensorBoard events BasicSR writes (``tb_logger/<name>``); needs tensorboard.

    Tags ``losses/<name>`` are losses, ``metrics/<dataset>/<metric>`` validation metrics (BasicSR's names).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    if not glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
        raise FileNotFoundError(f'{logdir}: no TensorBoard event files in this folder')
    acc = EventAccumulator(logdir, size_guidance={'scalars': 0})
    acc.Reload()
    loss, metric = {}, {}
    for tag in acc.Tags()['scalars']:
        series = {e.step: e.value for e in acc.Scalars(tag)}
        if tag.startswith('losses/'):
            loss[tag[len('losses/'):]] = series
        elif tag.startswith('metrics/'):
            metric[tag[len('metrics/'):]] = series
    return {'loss': {k: _finish(v) for k, v in loss.items()}, 'metric': {k: _finish(v) for k, v in metric.items()},
            'lr': []}


__all__ = ['parse_train_log', 'read_tensorboard', 'log_files']
