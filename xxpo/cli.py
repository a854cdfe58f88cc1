"""Command line: ``xxpo train ...`` trains one method; ``xxpo reproduce ...`` re-runs the notebooks.

Every ``TrainConfig`` field is an option of ``xxpo train`` (``--help`` prints each field's help).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from xxpo.train.config import TrainConfig, config_fields

PROFILES = ("smoke", "full", "gpu")


def _parse_value(type_str: str):
    """argparse ``type=`` for a dataclass field type string such as 'int | None' or 'float'."""
    optional = "None" in type_str
    base = type_str.replace("| None", "").replace("None |", "").strip()

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        if base == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        return text

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xxpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train one method and write metrics.csv and summary.json",
                        description="Train one method from a cached SFT base model. Unset options take the "
                                    "method's preset (the paper's setting, scaled down) or the suite default.")
    tr.add_argument("--out", required=True, help="output directory for metrics.csv, summary.json and checkpoints")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out if there is one")
    tr.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="train with N processes on this machine (data parallel: gloo on CPU, one GPU each on CUDA); "
                         "for several machines launch `torchrun ... -m xxpo.cli train ...` instead (default: 1)")
    tr.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                    help="import a Python module or .py file first, e.g. one that defines a method with "
                         "xxpo.presets.register (repeatable)")
    for name, type_str, default, help_text in config_fields():
        tr.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_parse_value(type_str), default=argparse.SUPPRESS,
                        help=f"{help_text} (default: {'preset' if default is None else default})")

    rp = sub.add_parser("reproduce", help="run the reproduction notebooks with papermill",
                        description="Run notebooks with papermill. 'full' executes them in place (the committed "
                                    "record); 'smoke' writes executed copies into a scratch directory.")
    rp.add_argument("notebooks", nargs="*", help="notebook paths (default: every notebooks/*.ipynb)")
    rp.add_argument("--profile", choices=PROFILES, default="smoke", help="parameter profile (default: smoke)")
    rp.add_argument("--check-seeds", default=None, type=_seed_list,
                    help="with --profile full: re-run each record with these reported seeds (e.g. 5,6,7,8,9) and "
                         "store the re-run's verdicts in the record, beside its own")
    rp.add_argument("--scratch", default=None, help="output directory for smoke and gpu runs (default: a temp dir)")
    rp.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a notebook parameter for papermill, e.g. -p model /models/Qwen2.5-0.5B-Instruct "
                         "-p task jsonl:/data/train.jsonl,/data/test.jsonl -p seeds '[0, 1]' (VALUE is read as JSON "
                         "when it parses, else as a string; repeatable; not with --profile full)")
    return parser


def _seed_list(text: str) -> list[int]:
    """``"5,6,7"`` -> ``[5, 6, 7]`` (for ``--check-seeds``)."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def import_user_code(spec: str) -> None:
    """Import a module by dotted name, or a ``.py`` file by path (for methods defined outside xxpo)."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--import: no such file {spec!r}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(spec)
        except ImportError as err:
            raise ValueError(f"--import: cannot import {spec!r}: {err}") from err


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` (what each launched process is given)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``xxpo <argv>`` in ``nproc`` processes on this machine with torchrun; its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "xxpo.cli", *without_nproc(argv)]
    return subprocess.run(cmd, check=False).returncode


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from xxpo.presets import PRESETS
    from xxpo.train import train
    from xxpo.train.distributed import data_parallel_requested, world_size_from_env

    for spec in args.imports:
        import_user_code(spec)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "out", "resume", "imports", "nproc")}
    method = overrides.pop("method", "grpo")
    config = TrainConfig.from_preset(method, **overrides)
    preset = PRESETS[config.method]
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and (preset.is_preference or preset.update == "trpo"):
        raise ValueError(f"--nproc {args.nproc}: method {config.method!r} trains in one process (data parallelism "
                         "runs the policy-gradient loop with gradient updates; not TRPO, not the preference methods)")
    if args.nproc > 1 and not data_parallel_requested():
        return launch(args.nproc, argv)
    if args.nproc > 1 and world_size_from_env() != args.nproc:
        raise ValueError(f"--nproc {args.nproc} but torchrun started {world_size_from_env()} processes")
    if preset.is_preference:
        from xxpo.train.preference import train_preference

        result = train_preference(config, args.out, resume=args.resume)
    else:
        result = train(config, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: rank 0 reports
        return 0
    s = result.summary
    print(json.dumps({k: s[k] for k in ("method", "task", "seed", "base_eval_accuracy", "final_eval_accuracy",
                                        "seconds_per_step")}, indent=2))
    print(f"wrote {Path(args.out) / 'metrics.csv'} and {Path(args.out) / 'summary.json'}")
    return 0


def notebook_parameters(pairs: list[list[str]]) -> dict:
    """``-p NAME VALUE`` pairs as papermill parameters: VALUE as JSON when it parses (``3``, ``[0, 1]``,
    ``null``, ``true``), else the string itself (paths, ``jsonl:...`` task strings)."""
    out = {}
    for name, value in pairs:
        if not name.isidentifier():
            raise ValueError(f"-p: parameter names are Python identifiers, got {name!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def cmd_reproduce(args: argparse.Namespace) -> int:
    from xxpo.reproduce import reproduce

    results = reproduce(args.notebooks or None, profile=args.profile, scratch=args.scratch,
                        check_seeds=args.check_seeds, parameters=notebook_parameters(args.parameters))
    return 0 if all(r["ok"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, argv)
        return cmd_reproduce(args)
    except ValueError as err:
        print(f"xxpo: error: {err}", file=sys.stderr)
        return 2
    finally:
        dist = sys.modules.get("torch.distributed")  # a data-parallel run leaves its process group to close
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
