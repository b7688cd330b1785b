"""`bamba-ckpt COMMAND ...` (also `python -m checkpoints_tools`): offline tools over checkpoints."""

from __future__ import annotations

import argparse
import json
import pickle
import sys

from checkpoints_tools import consolidate, describe, export_hf, import_hf, import_original
from checkpoints_tools.common import parse_dtype
from checkpoints_tools.inspect_checkpoint import format_description

EXAMPLES = """examples:
  bamba-ckpt inspect runs/default
  bamba-ckpt consolidate runs/default model.safetensors --dtype bf16
  bamba-ckpt export-hf runs/default/checkpoints/step-00000300 hf-out --dtype bf16
  bamba-ckpt import-hf downloads/Bamba-9B bamba9b-ckpt
  bamba-ckpt import-original step_100000_ckp bamba9b-ckpt --config bamba-9b

CKPT is a checkpoint directory, or a run directory / checkpoints folder (its latest complete
checkpoint is used). A checkpoint written by import-hf / import-original is continued with
`fms-bamba train ... --checkpoint.init_from=OUT --checkpoint.init_load=model`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bamba-ckpt", description="Offline tools over Bamba checkpoints.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help)

    def overwrite(p: argparse.ArgumentParser) -> None:
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (else refused)")

    p = command("consolidate", "a sharded checkpoint -> one .safetensors (or .pt/.pth/.bin torch) file")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("out", metavar="OUT", help="*.safetensors, or *.pt / *.pth / *.bin for a torch file")
    p.add_argument("--optimizer", action="store_true",
                   help="include the optimizer's tensors; keys then keep their model./optimizer. prefixes")
    p.add_argument("--dtype", help="fp32 | bf16 | fp16 for floating-point tensors (default: as stored)")
    overwrite(p)

    p = command("export-hf", "a checkpoint -> a folder BambaForCausalLM.from_pretrained loads")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer file or folder to copy (default: the run's tokenizer/ when CKPT is in a run)")
    p.add_argument("--dtype", help="fp32 | bf16 | fp16 (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    overwrite(p)

    p = command("import-hf", "a transformers Bamba folder -> a checkpoint the trainer continues from")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32, the trainer's master weights)")
    overwrite(p)

    p = command("import-original", "an original-trainer (mamba-ssm names) checkpoint -> a checkpoint")
    p.add_argument("src", metavar="SRC", help="a torch file (consolidated.00.pth, ...) or a DCP directory")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--config", help="a mamba-ssm config.json or a preset name (default: config.json beside SRC)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    overwrite(p)

    p = command("inspect", "step, tokens, data progress, parameters, dtypes, size, completeness")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "consolidate":
        print(consolidate(args.ckpt, args.out, optimizer=args.optimizer, dtype=parse_dtype(args.dtype),
                          overwrite=args.overwrite))
    elif args.command == "export-hf":
        print(export_hf(args.ckpt, args.out, tokenizer=args.tokenizer, dtype=parse_dtype(args.dtype),
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite))
    elif args.command == "import-hf":
        print(import_hf(args.hf_dir, args.out, dtype=parse_dtype(args.dtype), overwrite=args.overwrite))
    elif args.command == "import-original":
        print(import_original(args.src, args.out, config=args.config, dtype=parse_dtype(args.dtype),
                              overwrite=args.overwrite))
    elif args.command == "inspect":
        description = describe(args.ckpt)
        print(json.dumps(description, indent=1) if args.json else format_description(description))
        return 0 if description["checkpoint"]["complete"] else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 `inspect` found the checkpoint incomplete, 2 bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"bamba-ckpt {args.command}: error: {message}", file=sys.stderr)
        return 2
