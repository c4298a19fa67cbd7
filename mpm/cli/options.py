"""How every command maps its command line onto its typed config (the one way, for every command).

    mpm GROUP COMMAND [--config FILE.yaml] [--flag VALUE ...] [key.sub=value ...] [--print-config]

A command's flags are a table of `Flag(flag, config key, kind, help)`: each flag sets one config key, so every
setting can also come from YAML or a dotted override. Positional words that are not `key=value` overrides of the
command's config are its positional argument (a message, a folder), itself a config key.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

OVERRIDE = re.compile(r"^([A-Za-z_]\w*)(\.[A-Za-z_]\w*)*=")


@dataclass(frozen=True)
class Flag:
    flag: str  # "--image-size"
    key: str  # "resize.image_size"
    kind: Any  # a type (str, int, float), "list" (comma-separated), "append" (repeatable), "flag" (store_true)
    help: str
    const: Any = None  # for kind "const": the value the flag sets
    short: str | None = None  # a one-letter alias ("-o")


def add_command(
    commands,
    name: str,
    handler,
    schema,
    flags: list[Flag] = (),
    positional: tuple[str, str] | None = None,
    config_required: bool = False,
    extra_flags=None,
    **parser_kwargs,
) -> argparse.ArgumentParser:
    """A subcommand with --config, its flags, `key=value` overrides and --print-config.

    Args:
        handler: `handler(cfg, args) -> exit status`, called with the command's resolved config.
        schema: the config dataclass, or "package.module:Class" (imported only when the command runs, so building
            the parser stays cheap).
        positional: (config key, help) of the one positional argument the command takes, if any.
        extra_flags: `extra_flags(args, load) -> {key: value}` for a flag whose key depends on the config
            (`load()` gives the config without it).
    """
    p = commands.add_parser(name, **parser_kwargs)
    p.add_argument("--config", required=config_required, help="YAML config file (keys as printed by --print-config)")
    for f in flags:
        kwargs = {"dest": f.key, "default": argparse.SUPPRESS, "help": f"{f.help} [{f.key}]"}
        names = [f.short, f.flag] if f.short else [f.flag]
        if f.kind == "flag":
            p.add_argument(*names, action="store_true", **kwargs)
        elif f.kind == "const":
            p.add_argument(*names, action="store_const", const=f.const, **kwargs)
        elif f.kind == "append":
            p.add_argument(*names, action="append", metavar=_metavar(f), **kwargs)
        elif f.kind == "list":
            p.add_argument(*names, type=_comma_list, metavar=_metavar(f), **kwargs)
        else:
            p.add_argument(*names, type=f.kind, metavar=_metavar(f), **kwargs)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    words = "KEY=VALUE" if positional is None else f"{positional[0].upper()} | KEY=VALUE"
    help_text = "dotted config overrides, e.g. a.b=1" + ("" if positional is None else f"; {positional[1]}")
    p.add_argument("words", nargs="*", metavar=words, help=help_text)
    p.set_defaults(
        handler=handler, schema=schema, flag_table=list(flags), positional=positional, extra_flags=extra_flags,
        command_parser=p,
    )  # fmt: skip
    return p


def run_command(args: argparse.Namespace) -> int:
    """Resolve the command's config, print it (--print-config) or hand it to the command."""
    cfg = load_command_config(args)
    if args.extra_flags is not None:
        cfg = load_command_config(args, args.extra_flags(args, lambda: cfg))
    if args.print_config:
        from mpm.core.config import config_to_yaml

        sys.stdout.write(config_to_yaml(cfg))
        return 0
    return args.handler(cfg, args)


def load_command_config(args: argparse.Namespace, extra_flags: dict | None = None):
    """The command's typed config: defaults < --config < flags < overrides (mpm.core.config.load_config)."""
    from mpm.core.config import load_config
    from mpm.core.errors import ConfigError

    schema = args.schema
    if isinstance(schema, str):
        module, _, name = schema.partition(":")
        schema = getattr(importlib.import_module(module), name)
    table = args.flag_table
    flags = {f.key: getattr(args, f.key) for f in table if hasattr(args, f.key)}
    flags.update(extra_flags or {})
    if args.positional is None:  # every word is an override (an unknown key is an error naming it)
        overrides = args.words
    else:
        overrides, rest = split_words(schema, args.words)
        many = str({f.name: f.type for f in fields(schema)}.get(args.positional[0], "")).startswith("list")
        if many:  # a list-typed positional (several files) takes every word that is not an override
            if rest:
                flags[args.positional[0]] = rest
            return load_config(schema, args.config, flags, overrides)
        if len(rest) > 1:
            raise ConfigError(
                f"expected one {args.positional[0]}, got {len(rest)} words {rest} (quote a value that has spaces; "
                "overrides look like key.sub=value with a key of this command's config)"
            )
        if rest:
            flags[args.positional[0]] = rest[0]
    return load_config(schema, args.config, flags, overrides)


def split_words(schema: type, words: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, other words): a word is an override when it is `key=value` and `key` starts with a field of
    the config, so a message such as "x=1?" stays a message."""
    names = {f.name for f in fields(schema)} if is_dataclass(schema) else set()
    overrides, rest = [], []
    for word in words:
        match = OVERRIDE.match(word)
        if match and match.group(1) in names:
            overrides.append(word)
        else:
            rest.append(word)
    return overrides, rest


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _metavar(f: Flag) -> str:
    return f.flag.lstrip("-").upper().replace("-", "_")
