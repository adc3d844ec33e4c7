"""The ``basicsr`` command: BasicSR's train and test pipelines with nl_plugin loaded.

    basicsr train -opt options/train_nlrn_denoise.yml [--auto_resume] [--check_data] [--debug] [--force_yml k:k=v ...]
    basicsr test  -opt options/test_nlrn_denoise.yml
    basicsr infer --model net_g_latest.pth --input photos/ --output restored/
    torchrun --nproc_per_node=2 $(which basicsr) train -opt X.yml --launcher pytorch

Outputs go to ``experiments/<name>`` (train) and ``results/<name>`` (test) under ``--root_path``
(default: the working directory), which is also where ``--auto_resume`` looks. The option file is
checked (and with ``--check_data`` every image decoded) before any output folder is created.
"""
import argparse
import os
import sys

_DESCRIPTION = """BasicSR 1.4.2 train/test pipelines with the nl_plugin components (NLRN, N3Net, DnCNN, VDSR,
their datasets, losses and RestorationModel) registered.

subcommands:
  train   train a network from a YAML option file (BasicSR's train pipeline); checkpoints and
          training states go to <root_path>/experiments/<name>/, resumable with --auto_resume
  test    evaluate a network from a YAML option file (BasicSR's test pipeline); images, logs and a
          per-image metrics CSV go to <root_path>/results/<name>/
  infer   run a trained network on your own images (no ground truth) from its weight file

Run 'basicsr train -h', 'basicsr test -h' or 'basicsr infer -h' for the flags."""


def _subparser(sub, name, help_text):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument('-opt', required=True, metavar='YML', help='path to the YAML option file')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                   help="'pytorch' under torchrun (gloo on CPU, nccl on GPUs); default: none")
    if name == 'train':
        p.add_argument('--auto_resume', action='store_true',
                       help='resume from the newest readable training state in experiments/<name>/training_states '
                            '(unreadable ones are renamed to *.corrupt)')
    p.add_argument('--check_data', action='store_true',
                   help='decode every training/validation image before anything is written (slow on big sets)')
    p.add_argument('--debug', action='store_true', help="BasicSR debug mode (name gets 'debug_', frequent logs)")
    p.add_argument('--local_rank', type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument('--force_yml', nargs='+', default=None, metavar='KEY=VALUE',
                   help='override option values, e.g. train:total_iter=100 datasets:train:sigma=50')
    p.add_argument('--root_path', default=None,
                   help='folder that receives experiments/ and results/ (default: working directory)')
    return p


def build_parser():
    parser = argparse.ArgumentParser(prog='basicsr', description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', metavar='{train,test,infer}')
    _subparser(sub, 'train', 'train a network with BasicSR (nl_plugin loaded)')
    _subparser(sub, 'test', 'test a network with BasicSR (nl_plugin loaded)')
    from nl_plugin.infer import build_parser as infer_parser
    infer_help = 'run a trained network on your own images (no ground truth)'
    infer_parser(sub.add_parser('infer', help=infer_help, description=infer_help))
    return parser


def _strip_own_flags(argv):
    """Drop the flags BasicSR's own parser does not know (--root_path VALUE, --check_data)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == '--root_path':
            i += 2
            continue
        if argv[i].startswith('--root_path=') or argv[i] == '--check_data':
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out


def _check_option_file(parser, path):
    """The option file must be a YAML mapping with the sections BasicSR's parser reads without defaults."""
    import yaml
    try:
        with open(path) as f:
            opt = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        parser.error(f'-opt: cannot read option file {path!r}: {" ".join(str(err).split())}')
    if not isinstance(opt, dict):
        what = 'is empty' if opt is None else f'holds a {type(opt).__name__}, not a mapping of options'
        parser.error(f'-opt: option file {path!r} {what}')
    for key, kind in (('name', str), ('model_type', str), ('datasets', dict), ('path', dict)):
        if not isinstance(opt.get(key), kind):
            what = 'is missing' if opt.get(key) is None else f'must be a {"mapping" if kind is dict else "string"}'
            parser.error(f'-opt: {path!r}: the option {key!r} {what}'
                         + (' (e.g. path: {pretrain_network_g: ~})' if key == 'path' else ''))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # validates flags and prints help; BasicSR re-parses the same flags
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == 'infer':
        from nl_plugin.infer import main as infer_main
        return infer_main(args=args)
    if not os.path.isfile(args.opt):
        parser.error(f'-opt: option file {args.opt!r} does not exist')
    _check_option_file(parser, args.opt)
    root_path = os.path.abspath(args.root_path or os.getcwd())

    import nl_plugin  # noqa: F401  (compat fixes + registration before BasicSR builds anything)
    from nl_plugin import compat
    compat.CHECK_DATA['enabled'] = args.check_data
    rest = _strip_own_flags(argv[1:])
    sys.argv = [f'basicsr {args.command}'] + rest  # BasicSR's parse_options reads sys.argv
    if args.command == 'train':
        from basicsr.train import train_pipeline
        train_pipeline(root_path)
    else:
        from basicsr.test import test_pipeline
        test_pipeline(root_path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
