"""Small helpers shared by the plugin's subpackages."""
import argparse
import importlib
import os


def import_submodules(package, package_file, suffix):
    """Import every ``*{suffix}.py`` next to ``package_file`` (BasicSR's scan-and-register idiom).

    Args:
        package (str): Dotted package name, e.g. ``'nl_plugin.archs'``.
        package_file (str): The package's ``__file__``.
        suffix (str): File-name suffix without ``.py``, e.g. ``'_arch'``.

    Returns:
        list[module]: The imported modules, sorted by name.
    """
    folder = os.path.dirname(os.path.abspath(package_file))
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(f'{suffix}.py'))
    return [importlib.import_module(f'{package}.{n}') for n in names]


def renamed_options(**renames):
    """Class decorator: constructor keywords that were given a new public name raise a one-line error.

    The project keeps one word for one idea across its options; an old spelling is refused with the new
    name instead of being silently accepted or failing as an unknown keyword.

    Args:
        **renames: ``old_name='new_name'`` pairs.

    Example:
        >>> @renamed_options(window_size='search_size')
        ... class Block(nn.Module): ...
        >>> Block(window_size=15)  # TypeError: Block: option 'window_size' is now called 'search_size'
    """
    def wrap(cls):
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    raise TypeError(f"{cls.__name__}: option '{old}' is now called '{new}'")
            init(self, *args, **kwargs)

        __init__.__wrapped__ = init  # inspect.signature (compat fix 6 lists valid keys) sees the real one
        __init__.__doc__ = init.__doc__
        cls.__init__ = __init__
        cls.renamed_options = dict(getattr(cls, 'renamed_options', {}), **renames)
        return cls
    return wrap


def key_value_arg(text):
    """argparse ``type`` for ``KEY=VALUE`` (e.g. ``--arch-opt num_feat=64``): the value read as YAML."""
    import yaml
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    return key, yaml.safe_load(value)


def cpuinfo_field(name, path='/proc/cpuinfo'):
    """The value of the first ``name : value`` line of the CPU description (``'model name'``, ``'flags'``, ...);
    None where the file is unreadable (not Linux) or has no such line."""
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition(':')
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def rss_mb(field='VmRSS'):
    """``VmRSS`` (resident memory) or ``VmHWM`` (its peak) of this process in MB (Linux), or None."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_rss_peak():
    """Hand freed heap memory back to the OS and reset the peak-RSS mark (``VmHWM``); True if it was reset
    (False where that is impossible: not Linux, not glibc)."""
    import ctypes
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except (OSError, AttributeError):
        return False


def run_process_group(cmd, timeout=None, **kwargs):
    """``subprocess.run(cmd, timeout=timeout, **kwargs)`` in a process group of its own, the whole group
    killed on timeout: a launcher's children (torchrun's workers, inductor's compile workers) would
    otherwise outlive it and run on beside whatever is measured next.

    Raises:
        subprocess.TimeoutExpired: after the group was killed.
    """
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
