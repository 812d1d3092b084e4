"""Command line: atp prepare | eval | prune | export | bench | compare | demo | plan."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
import threading
import typing

from .cliparts import config_help, print_prune_report
from .errors import ATPError


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per config field, its help from the field's metadata; defaults stay None so that a YAML
    file's values are not overridden."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})".strip()
        if kind is bool or kind == (bool | None):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            name = "--train-file" if f.name == "train_files" else flag
            parser.add_argument(name, dest=f.name, action="append", default=None, help=help_text)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def config_from_args(args, config_cls):
    values = config_cls.yaml_values(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(config_cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return config_cls(**values)


def cmd_prepare(args) -> int:
    from .models import resolve_model

    print(resolve_model(args.model))
    return 0


def cmd_eval(args) -> int:
    from .evaluation import run_eval_command

    return run_eval_command(args)


def cmd_prune(args) -> int:
    from .options import ATPConfig, resume_config
    from .rundir import restore_interrupted
    from .train import train

    if args.resume:
        restore_interrupted(args.resume)  # a run killed while replacing this one: its config.yaml goes back
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ATPConfig) if getattr(args, f.name) is not None}
        if args.config:
            given = {**ATPConfig.yaml_values(args.config), **given}
        cfg = resume_config(args.resume, given)
    else:
        cfg = config_from_args(args, ATPConfig)
    report = train(cfg, resume=bool(args.resume))
    if "exported_params" in report:
        print_prune_report(report)
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare

    return run_compare(args.config, dry_run=args.dry_run, report_only=args.report_only)


def cmd_demo(args) -> int:
    from .demo import run_demo_command

    return run_demo_command(args)


def build_parser() -> argparse.ArgumentParser:
    from .options import ATPConfig

    parser = argparse.ArgumentParser(
        prog="atp",
        description="ATP: one-stage structural pruning + LoRA tuning that turns a general LLM into a small domain model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="prepare a model (convert the embedded SmolLM2 GGUF once) and print its path")
    p.add_argument("--model", default="smollm2-135m", help=config_help("model"))
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eval", help="evaluate a dense or pruned model on domain tasks (perplexity, accuracy, ROUGE)")
    from .evaluation import add_eval_arguments

    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="ATP: prune and LoRA-tune in one run, then export a physically smaller model")
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest intact checkpoint")
    add_config_arguments(p, ATPConfig)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="write a dense, uniform or heterogeneous model as a GGUF file for llama.cpp")
    from .gguf_export import add_export_arguments, run_export_command

    add_export_arguments(p)
    p.set_defaults(func=run_export_command)

    p = sub.add_parser("bench", help="speed and size of a dense and pruned models side by side (ratios, medians)")
    from .bench import add_bench_arguments, run_bench_command

    add_bench_arguments(p)
    p.set_defaults(func=lambda args: run_bench_command(args))

    p = sub.add_parser("compare", help="ATP vs two-stage baselines and ablations: methods x sparsities x domains "
                                       "x seeds from one YAML config; resumable; markdown, JSON and plots",
                       description="Runs every cell (train, then evaluate on the dev split) that has no result yet. "
                                   "In the background: nohup atp compare --config X > compare.log 2>&1 &")
    p.add_argument("--config", required=True, help="YAML file (keys: see atp.compare, e.g. benchmarks/compare.yaml)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--report-only", action="store_true", help="write tables and plots from finished cells, run nothing")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="prune SmolLM2 25%% on healthcare data in minutes, then show dense vs pruned: "
                                    "size, speed, perplexity, accuracy, ROUGE and answers side by side")
    from .demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plan", help="predicted peak memory per device of an atp prune run, from the model's config "
                                    "alone (bf16 or QLoRA base, DDP or FSDP over N processes)")
    from .plan import add_plan_arguments, run_plan_command

    add_plan_arguments(p)
    p.set_defaults(func=run_plan_command)
    return parser


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)


def user_error(err: BaseException) -> str | None:
    """The message for an error that bad input or a bad environment causes (a full disk, an unwritable
    folder, a binary or absurdly nested input), or None for a bug, which keeps its traceback.
    Set ATP_TRACEBACK=1 to see the traceback of these too."""
    from .fsutil import describe_write_error, is_torch_write_failure, safetensors_os_error

    if isinstance(err, ATPError):
        return str(err)
    err = safetensors_os_error(err) or err
    if is_torch_write_failure(err):
        return describe_write_error(err, None)
    if isinstance(err, OSError):
        if err.errno in WRITE_ERRNOS:  # atp writes far more than it reads outside its checked inputs
            return describe_write_error(err, err.filename)
        return f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    if isinstance(err, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({err.reason} at byte {err.start})"
    if isinstance(err, RecursionError):
        return "an input is nested too deeply to read (Python's recursion limit)"
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's time limit, docker stop), handled like Ctrl-C: temps removed, earlier runs put
    back."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.func(args)
    except Terminated:
        print("atp: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("atp: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error(err)
        if message is None or (os.environ.get("ATP_TRACEBACK") and not isinstance(err, ATPError)):
            raise
        print(f"atp: error: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
