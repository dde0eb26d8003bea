"""The `topopack` console script: one subcommand per module, imported on demand.

A user mistake (a bad file, flag or value) ends with one line on stderr and exit status 2; set
TOPOPACK_TRACEBACK=1 to see the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS = {
    "demo": ("topopack.model.demo", "run the main job on synthetic slides"),
    "synth": ("topopack.model.synth", "write synthetic slides in the TRIDENT h5 format"),
    "pretrain": ("topopack.model.pretrain", "pretrain the slide encoder (MAE or MoCo)"),
    "finetune": ("topopack.model.finetune", "train the connector and LoRA LLM (connector or vqa stage)"),
    "eval": ("topopack.model.evaluate", "score a fine-tuned model on held-out VQA"),
    "ask": ("topopack.model.ask", "answer a question about a slide, or a file of questions"),
    "data": ("topopack.model.data_check", "validate instruction files (either schema) and count them"),
    "extract": ("topopack.model.extract", "slides (.svs, .tiff, ...) -> TRIDENT-layout feature files"),
}
# the commands that train across processes under torchrun; the others write their files from one process
DISTRIBUTED = ("pretrain", "finetune")
# what a user's input can raise: bad files, values, paths (SlideError, LayoutError, VQAError, RegionError and the
# checkpoint errors are ValueErrors)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="topopack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv:
        parser.print_help()
        return 2
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, or an error naming the bad command
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv[0] not in DISTRIBUTED:
        print(f"topopack {argv[0]}: error: runs in one process; launch it without torchrun "
              f"(only {' and '.join(DISTRIBUTED)} train across processes)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd = argparse.ArgumentParser(prog=f"topopack {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("TOPOPACK_TRACEBACK") == "1":
            raise
        print(f"topopack {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
