"""The `dinospec` command: a thin layer over functions that are also callable from Python."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from dinospec.analysis.cli import register as register_analysis
from dinospec.config import ConfigError, load_config, load_model_config
from dinospec.models.checkpoints import CheckpointError
from dinospec.models.export_formats import EXPORT_FORMATS
from dinospec.run.lock import RunDirLocked
from dinospec.train.signals import Interrupted

PLUGIN_GROUP = "dinospec.commands"
"""Entry points of this group add subcommands: packages built on dinospec (eval) plug in
their commands without dinospec importing them."""


def _info(args: argparse.Namespace) -> None:
    from dinospec.report import compare_with_vanilla, format_report

    config = load_config(args.config, args.overrides)
    rows = compare_with_vanilla(config.model, args.img_size)
    print(f"{args.config} ({', '.join(args.overrides) or 'no overrides'})")
    print(format_report(rows, args.img_size))


def _train(args: argparse.Namespace) -> int:
    """A run stopped by a signal has written its checkpoint and said so: a clean exit
    (status 0), which the same command resumes. A second Ctrl-C stops it at once (130)."""
    from dinospec.train.loop import train

    try:
        train(load_config(args.config, args.overrides))
    except Interrupted:
        return 0
    except KeyboardInterrupt:
        print("dinospec: stopped by a second Ctrl-C, without a checkpoint", file=sys.stderr)
        return 130
    return 0


def _export(args: argparse.Namespace) -> None:
    from dinospec.models.checkpoints import load_backbone
    from dinospec.models.export_formats import DEFAULT_NAMES, export_backbone
    from dinospec.run.exports import backbone_file

    path = backbone_file(args.source)
    config = load_model_config(args.model_config) if args.model_config else None
    model = load_backbone(path, config, args.num_heads, heads_key="--num-heads")
    stem = path.name.split(".")[0]
    out = Path(args.out) if args.out else path.parent / DEFAULT_NAMES[args.format].format(stem=stem)
    for line in export_backbone(model, args.format, out):
        print(line)


def _config_show(args: argparse.Namespace) -> None:
    from dinospec.config.show import describe_config

    print("\n".join(describe_config(args.config, args.overrides)))


def train_epilog() -> str:
    """The sections of a config and where to read every key, then the pretrained-weights
    keys most runs set."""
    from dinospec.config.docs import SECTION_DOCS

    sections = "\n".join(f"  {name:<12}{doc}" for name, doc in SECTION_DOCS.items())
    return (
        f"config sections (override any key as section.key=value):\n{sections}\n\n"
        "every key with its value, default and meaning:\n"
        "  dinospec config show CONFIG [key=value ...]\n\n" + PRETRAINED_HELP
    )


PRETRAINED_HELP = """\
continue from pretrained weights:
  train.pretrained_weights=PATH   student and teacher backbones start from PATH: a DINOv2
                                  torch-hub .pth, a timm DINOv2 file, a Hugging Face
                                  Dinov2Model directory or weight file, a dinospec export
                                  or run directory (which also gives its heads). The
                                  file's architecture must match model.*; a vanilla file
                                  loads into a specialized model with the same function.
  optim.head_warmup_epochs=N      with new heads: N epochs training heads and centres
                                  alone, both backbones frozen (default 1)
  optim.backbone_warmup_epochs=N  then N epochs of linear lr warm-up for the backbone
                                  (default 1)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinospec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info", help="parameters and GFLOPs of a model config and of its vanilla twin"
    )
    info.add_argument("config", help="YAML config file")
    info.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.depth=6")
    info.add_argument("--img-size", type=int, default=224, help="input size for the FLOP count")
    info.set_defaults(func=_info)
    train = commands.add_parser(
        "train",
        help="self-supervised pretraining (resumes if possible)",
        description="Pretrain (or resume) the run a YAML config describes; its run "
        "directory is train.output_dir.",
        epilog=train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.seed=1")
    train.set_defaults(func=_train)
    _add_config_command(commands)
    export = commands.add_parser(
        "export",
        help="write a backbone for DINOv2's hub, timm, Hugging Face or as dinospec safetensors",
        description="Read a backbone (weight file in any layout dinospec reads, HF model "
        "directory or training run directory) and write it in another layout. Specialized "
        "backbones have no timm or Hugging Face equivalent and are refused there.",
    )
    export.add_argument("source", help="weight file, HF model directory or run directory")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument(
        "--out", default=None, help="output file (a directory for hf); default beside the source"
    )
    export.add_argument(
        "--model-config",
        default=None,
        help="YAML whose model section is the architecture (e.g. to specialize on the way)",
    )
    export.add_argument(
        "--num-heads", type=int, default=None, help="heads, for files that do not record them"
    )
    export.set_defaults(func=_export)
    register_analysis(commands)
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()(commands)
    return parser


def _add_config_command(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser("config", help="show a resolved config with every key explained")
    actions = config.add_subparsers(dest="action", required=True)
    show = actions.add_parser(
        "show",
        help="every key of a config: value, meaning, and default where it differs",
        description="Print the config a run would use (the file, the files it extends and "
        "the overrides, validated as `dinospec train` does), one key a line with its "
        "one-line doc; a key whose value is not the default also shows the default and the "
        "file or command line that set it.",
    )
    show.add_argument("config", nargs="?", default=None, help="YAML config (default: none)")
    show.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.seed=1")
    show.set_defaults(func=_config_show)


def main(argv: Sequence[str] | None = None) -> int:
    """Problems the user can fix are a message on stderr and status 2, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except ConfigError as err:
        print(f"dinospec: config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"dinospec: checkpoint error: {err}", file=sys.stderr)
        return 2
    except RunDirLocked as err:
        print(f"dinospec: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`dinospec config show ... | head`): nothing left to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        return 0
    except OSError as err:
        if err.filename is None:
            raise
        # a path the user gave cannot be read or written (permissions, a missing parent)
        print(f"dinospec: error: {err.strerror}: {err.filename}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
