"""Installable BasicSR plugin: NLRN and N3Net (NeurIPS 2018) for BasicSR 1.4.2."""
from setuptools import find_packages, setup

setup(
    name='nl_plugin',
    version='0.1.0',
    description='Non-local restoration (NLRN, N3Net) for BasicSR',
    long_description=open('README.md', encoding='utf-8').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['nl_plugin', 'nl_plugin.*']),
    package_data={'nl_plugin.data': ['manifests/*.sha256']},  # scripts/prepare_datasets.py's checksums
    license='Apache-2.0',
    python_requires='>=3.11',
    install_requires=[
        'torch>=2.14,<2.16',          # tested: 2.14.1 and 2.15.0 (README, 'Tested versions')
        'torchvision>=0.29,<0.30',    # tested: 0.29.1 and 0.29.2
        'basicsr==1.4.2',
        'mmengine',
        'opencv-python',
        'lmdb',
        'numpy>=2,<3',                # tested: 2.4.6
        'scikit-image',
        'tqdm',
        'pyyaml',
    ],
    extras_require={
        # Only needed to read official NLRN TF1 checkpoints (scripts/convert_nlrn_tf.py).
        'convert': ['tensorflow-cpu'],
        # Weight files in .safetensors (path:save_format, scripts/convert_weights.py, basicsr infer).
        'safetensors': ['safetensors'],
        # Loading nl_plugin weight files through spandrel / chaiNNer (nl_plugin.spandrel_support).
        'spandrel': ['spandrel', 'safetensors'],
        # scripts/export_onnx.py and its onnxruntime check.
        'onnx': ['onnx', 'onnxscript', 'onnxruntime'],
        # The test suite and the linter (`make test`, `make lint`); the optional formats and figure libraries
        # are included so that their tests run in CI instead of skipping.
        'test': ['pytest', 'ruff', 'safetensors', 'spandrel', 'onnx', 'onnxscript', 'onnxruntime', 'matplotlib',
                 'tensorboard'],
        # Figures (scripts/visualize_attention.py, plot_curves.py) and TensorBoard logging.
        'viz': ['matplotlib', 'tensorboard'],
    },
    entry_points={'console_scripts': ['basicsr = nl_plugin.cli:main']},
)
