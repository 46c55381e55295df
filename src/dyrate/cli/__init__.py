"""The `dyrate` command line. Each sub-command lives in its own module of this package with
`add_arguments(parser)` and `run(args) -> int`; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import DyrateError

# name -> (module, one-line help). Modules are imported when the parser is built.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("dyrate.cli.generate", "generate text for an image with a pruning policy"),
    "flops": ("dyrate.cli.flops", "FLOPs ratio of a policy under a named convention"),
    "demo": ("dyrate.cli.demo", "run every policy on the built-in model and compare them"),
    "bench": ("dyrate.cli.bench", "time, memory and FLOPs of every policy side by side"),
    "findk": ("dyrate.cli.findk", "VTW's withdrawal layer: next-token KL per layer on a few samples"),
    "eval": ("dyrate.cli.eval", "evaluate policies on caption / VQA / POPE data: quality, FLOPs, retained tokens"),
    "analyze": ("dyrate.cli.analyze", "attention share of sys / img / ins / res against generation step, per layer (PNG + JSON)"),
    "train-predictor": ("dyrate.cli.train_predictor", "train a DyRate rate predictor (MLP or GRU) on a frozen VLM"),
    "testbed": ("dyrate.cli.testbed", "build the testbed: scene data, training and evaluation of the small LLaVA"),
}


class ArgumentError(DyrateError):
    """A command-line argument argparse refused (the message names the command)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a refused argument is one line on stderr (`dyrate CMD: error: ...`) and exit
    code 2 through `main`, like every other refusal of the CLI; --help still shows the usage."""

    def error(self, message: str):
        raise ArgumentError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dyrate",
        description="Prune visual tokens inside a VLM decoder with a rate that adapts at every generated token.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ArgumentError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except DyrateError as err:
        print(f"dyrate {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system refused (permission, a file where a folder should be, disk full)
        where = f" ({err.filename})" if err.filename else ""
        print(f"dyrate {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"dyrate {args.command}: error: out of memory; ask for less (batch size, beams, tokens)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dyrate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m dyrate.cli
    sys.exit(main())
