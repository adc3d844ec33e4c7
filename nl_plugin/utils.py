"""Small helpers shared by the plugin's subpackages."""
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
