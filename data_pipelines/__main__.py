"""`python -m data_pipelines {scrub,train-tokenizer,pretokenize,eval-pii,bench}`."""

from __future__ import annotations

import argparse
import sys

from pretrain.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in (
        ("scrub", "raw corpus -> scrubbed shards + manifest.json + report.md/json"),
        ("train-tokenizer", "train a byte-level BPE tokenizer on scrubbed shards"),
        ("pretokenize", "write token-id memmap shards for the fastest loader path"),
    ):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", default=[], help="dotlist overrides, e.g. scrub.workers=2")
        p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")

    p = sub.add_parser("eval-pii", help="per-type precision/recall/F1 of the PII detector on labelled records")
    p.add_argument("labelled", help='jsonl of {"text": ..., "spans": [{"start", "end", "type"}]}, or builtin:pii-heldout[:SEED]')
    p.add_argument("--config", default=None, help="config whose scrub.pii section to use")
    p.add_argument("overrides", nargs="*", default=[], help="dotlist overrides")

    p = sub.add_parser("bench", help="throughput benchmarks; last line printed is one JSON object")
    p.add_argument("suite", nargs="?", default="scrub", choices=("pii", "scrub", "loader", "dedup"),
                   help="pii: PII alone; scrub: PII alone and the full pipeline; loader: training loader tokens/s; "
                        "dedup: bucketed dedup steps at growing N (peak RSS per step)")
    p.add_argument("--docs", default="100000,1000000", help="dedup: comma-separated document counts N")
    p.add_argument("--config", default=None, help="config file (defaults per suite)")
    p.add_argument("overrides", nargs="*")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`bench loader --config X key=value`): argparse stops
    # collecting positionals at the first option, so gather the key=value leftovers here.
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    from pretrain.config import load_config, to_yaml
    from pretrain.logging_setup import setup_logging

    path = getattr(args, "config", None)
    cfg = load_config(path, args.overrides)
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="")
        return 0
    setup_logging(cfg.run.log_level, cfg.run.log_all_ranks)

    if args.command == "scrub":
        from data_pipelines.scrub.runner import run_scrub

        return run_scrub(cfg) or 0
    if args.command == "train-tokenizer":
        from data_pipelines.tokenizer import train_tokenizer

        return train_tokenizer(cfg) or 0
    if args.command == "pretokenize":
        from data_pipelines.loading.pretokenize import pretokenize

        return pretokenize(cfg) or 0
    if args.command == "eval-pii":
        from data_pipelines.evaluation.pii_eval import eval_pii_cli

        return eval_pii_cli(args.labelled, cfg) or 0
    if args.command == "bench":
        if args.suite == "dedup":
            from data_pipelines.bench.dedup import bench_dedup

            return bench_dedup([int(x) for x in args.docs.split(",")])
        if args.suite == "loader":
            from data_pipelines.bench.loader import bench_loader

            return bench_loader(cfg) or 0
        from data_pipelines.bench.scrub import bench_scrub

        return bench_scrub(cfg, pii_only=args.suite == "pii") or 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
