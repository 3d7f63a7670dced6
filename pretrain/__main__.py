"""`python -m pretrain {train,bench,plan,audit,export,generate,config-reference}`.

Config-taking commands parse and validate the config before importing torch or deepspeed, so a
typo costs a second, not a cluster start-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from pretrain.dist import exit_process, strip_launcher_args
from pretrain.errors import exit_on_user_error
from pretrain.parent_death import arm_parent_death, started_by_launcher
from pretrain.stopping import catch_stop_signals_early


def _config_command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("config", help="YAML config file (may `extends:` others)")
    p.add_argument("overrides", nargs="*", default=[], help="dotlist overrides, e.g. model.n_layers=4")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    return p


def _gpu_counts(text: str) -> list[int]:
    try:
        gpus = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected GPU counts separated by commas, e.g. 1,8,64")
    return gpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _config_command(sub, "train", "train a model (same under python, torchrun, deepspeed and SLURM)")
    _config_command(sub, "bench", "time the real training step; last line printed is one JSON object")
    p = _config_command(sub, "plan", "memory per GPU and step time at N GPUs, before launch; last line printed is one JSON object")
    p.add_argument("--gpus", type=_gpu_counts, default=[1, 8, 64, 512], help="GPU counts (data-parallel ranks) to plan for, comma-separated")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (80 GB H100: 79.1; H200: 139.8)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing NVLink; larger counts cross InfiniBand")
    p.add_argument("--bench-json", default=None, help="a one-GPU `pretrain bench` output of this config: compute time per token")
    p.add_argument("--bus-bandwidth-gbs", type=float, default=None,
                   help="collective bus bandwidth in GB/s (nccl-tests busbw); default NVLink 450 within a node, InfiniBand 50 beyond")
    _config_command(sub, "audit", "memorization audit of the run's checkpoint: exposure and extraction of the "
                                  "canaries planted by the scrub (RUN_DIR/audit/)")

    p = sub.add_parser("export", help="consolidate a checkpoint into Hugging Face Llama format")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or step directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))

    p = sub.add_parser("generate", help="sample text from a checkpoint or an export directory")
    p.add_argument("--checkpoint", required=True, help="run/checkpoint directory or export directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()  # first: arm_parent_death checks the parent did not die before it ran
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)

    if args.command == "config-reference":
        from pretrain.config import reference_markdown

        print(reference_markdown(), end="")
        return 0

    if args.command == "plan":
        from pretrain.config import load_config, to_yaml

        cfg = load_config(args.config, args.overrides, world_size=args.gpus[0])
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from pretrain.logging_setup import setup_logging
        from pretrain.plan.report import run_plan

        setup_logging("warning")
        return run_plan(cfg, args.config, args.gpus, args.gpu_memory_gib, args.bench_json, args.bus_bandwidth_gbs,
                        args.gpus_per_node)

    if args.command == "train":
        catch_stop_signals_early()  # before torch and DeepSpeed import: a preemption warning then is kept
    if args.command in ("train", "bench", "audit"):
        if started_by_launcher():  # a worker of torchrun / deepspeed / srun dies with its launcher
            arm_parent_death(parent)
        from pretrain.config import load_config, to_yaml

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from pretrain.logging_setup import setup_logging

        setup_logging(cfg.run.log_level, cfg.run.log_all_ranks)
        if args.command == "train":
            from pretrain.trainer import train

            return train(cfg) or 0
        if args.command == "audit":
            from pretrain.audit import run_audit

            return run_audit(cfg)
        from pretrain.bench.trainer import bench

        return bench(cfg) or 0

    from pretrain.logging_setup import setup_logging

    setup_logging()
    if args.command == "export":
        from pretrain.export import export_checkpoint

        export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
        return 0
    if args.command == "generate":
        from pretrain.generate import generate_cli

        return generate_cli(args) or 0
    raise AssertionError(args.command)


def cli() -> NoReturn:
    """The `pretrain` console script and `python -m pretrain`: main(), then exit_process (see there)."""
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    exit_process(status)


if __name__ == "__main__":
    cli()
