"""`bench`: run suites, list what is registered, show tables.

    bench run [key=value ...]      e.g. bench run suite=hybrid models=[jem,wrn] data=digits scale=small
    bench list suites|models|datasets|metrics
    bench table RESULTS_DIR

User mistakes print one line and exit 2; a run in which a model failed exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _cmd_run(args) -> int:
    from bench import console
    from bench.config import load_config
    from bench.runner import run
    from bench.tables import print_run_table

    cfg = load_config(args.overrides)
    outcome = run(cfg)
    print_run_table([r for r, _ in outcome.records])
    for _, path in outcome.records:
        console.info(f"[dim]record: {path}[/dim]")
    return 1 if outcome.failed else 0


def _cmd_list(args) -> int:
    from bench.console import out

    what = args.what
    if what == "suites":
        from bench.suites import load_suite, suite_names

        for n in suite_names():
            s = load_suite(n)
            line = f"{n:<14} v{s.version}  models={','.join(s.models)}  metrics={','.join(s.metrics)}"
            out.print(line, highlight=False)
    elif what == "models":
        from bench.capabilities import CAPABILITIES
        from bench.models import MODELS

        for n, cls in MODELS.items():
            caps = [c for c, proto in CAPABILITIES.items() if all(hasattr(cls, m) for m in _proto_methods(proto))]
            out.print(f"{n:<18} {cls.family:<15} {', '.join(caps)}", highlight=False)
    elif what == "datasets":
        from bench.data import DATASETS
        from bench.data.registry import PATH_LOADERS

        for n in DATASETS.names():
            out.print(f"{n}:<path>" if n in PATH_LOADERS else n, highlight=False)
    elif what == "metrics":
        from bench.metrics import METRICS

        for n, m in METRICS.items():
            out.print(f"{n:<10} {m.arrow} unit={m.unit or '-':<3} requires={','.join(m.requires)}", highlight=False)
    return 0


def _proto_methods(proto) -> list[str]:
    return [m for m in ("logits", "energy", "log_prob", "sample") if m in proto.__dict__]


def _cmd_table(args) -> int:
    from bench.tables import print_results_dir

    print_results_dir(args.path)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        sys.stderr.write(f"bench: error: {message}; see 'bench --help'\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="Benchmark and evaluation harness for deep generative models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a suite: bench run suite=hybrid models=[jem,wrn] scale=small")
    r.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    r.set_defaults(fn=_cmd_run)
    ls = sub.add_parser("list", help="list suites, models, datasets or metrics")
    ls.add_argument("what", choices=["suites", "models", "datasets", "metrics"])
    ls.set_defaults(fn=_cmd_list)
    t = sub.add_parser("table", help="show the records under a results directory")
    t.add_argument("path")
    t.set_defaults(fn=_cmd_table)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_fidelity")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    args = build_parser().parse_args(argv)
    from bench.errors import BenchError

    try:
        return args.fn(args)
    except BenchError as e:
        sys.stderr.write(f"bench: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
