"""The ``ofa-timm`` command line, a thin layer over the library: ``run`` (the whole pipeline) and ``demo``,
``train`` (progressive shrinking, also under ``torchrun``), ``latency``, ``predictor``, ``search`` and ``export``. One
module per verb group."""
import argparse
import os
import shlex
import sys
from typing import List, Optional

from . import run, specialize, train

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='ofa-timm', description='Once-for-All elastic supernets for timm.')
    sub = parser.add_subparsers(dest='command', required=True)
    train.add_parsers(sub)
    run.add_parsers(sub)
    specialize.add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command. Errors the user can fix (bad arguments, files, data, no network, a folder in use) print one
    line and exit 2; SIGINT/SIGTERM exit 130/143 without a traceback, after a checkpoint and the command that
    resumes."""
    from ..pipeline import PipelineInterrupted
    from ..training import TrainingInterrupted
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ConnectionError) as e:
        print(f'ofa-timm {args.command}: error: {e}', file=sys.stderr)
        return 2
    except (TrainingInterrupted, PipelineInterrupted) as e:
        print(f'ofa-timm {args.command}: {e}', file=sys.stderr)
        if args.command in ('train', 'run', 'demo') and int(os.environ.get('RANK', '0')) == 0:
            # train continues with --resume; the pipeline continues whatever its work folder holds
            resume = argv if args.command != 'train' or '--resume' in argv else [*argv, '--resume']
            print(f'Resume with: {shlex.join(["ofa-timm", *resume])}', file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # outside training (data, model, search, export): nothing to checkpoint
        print(f'ofa-timm {args.command}: interrupted', file=sys.stderr)
        return 130
