"""The `mpm` command line: the only place in the project that parses arguments; nothing imports it.

One module per command group registers its subcommands (demo, data, unimm, train, align, chat, paint, eval,
export, serve). Every command takes `--config FILE.yaml`, its flags (each sets one config key) and dotted `key=value`
overrides (mpm/cli/options.py).
Modules import the library lazily, inside the commands, so `mpm --help` does not load torch.

Errors: any `mpm.core.errors.UserError` becomes one line, `error: ...`, and exit status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mpm.cli import align, chat, data, demo, eval, export, paint, serve, train, unimm
from mpm.cli.options import run_command

GROUPS = [demo, data, unimm, train, align, chat, paint, eval, export, serve]


def build_parser() -> argparse.ArgumentParser:
    from mpm import __version__

    parser = argparse.ArgumentParser(
        prog="mpm",
        description="MPM toolkit: multilingual multimodal models trained on English image-text data.",
    )
    parser.add_argument("--version", action="version", version=f"mpm-toolkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO level)")
    groups = parser.add_subparsers(
        dest="group", required=True, metavar="{demo,data,unimm,train,align,chat,paint,eval,export,serve}"
    )
    for group in GROUPS:
        group.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Overrides may come after flags (`--processes 2 resize.image_size=384 --threads 4`): argparse stops filling a
    # positional list at the first flag, so the words it leaves over are added to it here.
    args, extra = build_parser().parse_known_args(argv)
    unknown = [w for w in extra if w.startswith("-")]
    if unknown or (extra and not hasattr(args, "words")):
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    args.words = [*args.words, *extra]
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from mpm.core.errors import UserError

    try:
        return run_command(args)
    except UserError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
