"""`bench`: run suites, list what is registered, show tables.

    bench run [key=value ...]      e.g. bench run suite=hybrid models=[jem,wrn] data=digits scale=small
    bench list suites|models|datasets|metrics
    bench table RESULTS_DIR
    bench compare BASELINE CANDIDATE [--tol fid:5%] [--markdown FILE] [--json FILE]
    bench baseline update RESULTS

User mistakes print one line and exit 2; a run in which a model failed exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from bench.errors import UserError  # light: imports no torch


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
        from bench.capabilities import class_capabilities
        from bench.models import MODELS

        for n, cls in MODELS.items():
            caps = class_capabilities(cls)
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


def _cmd_table(args) -> int:
    from bench.tables import print_results_dir

    print_results_dir(args.path)
    return 0


def _cmd_compare(args) -> int:
    from bench import gate
    from bench.console import out
    from bench.tables import render

    overrides = gate.parse_tol_overrides(args.tol or [])
    if not (args.k >= 0):
        raise UserError(f"--k must be a non-negative number, got {args.k}")
    report = gate.compare(gate.load_records(args.baseline, "baseline"), gate.load_records(args.candidate, "candidate"),
                          k=args.k, overrides=overrides)
    df = gate.report_frame(report)
    status = {0: "pass", 1: "REGRESSION", 2: "INCOMPARABLE"}[report.exit_code]
    out.print(render(df, f"bench compare: {status} (k={args.k:g})"))
    if args.markdown:
        _write_text(args.markdown, gate.markdown(report))
    if args.json:
        import json

        _write_text(args.json, json.dumps(report.to_json(), indent=2) + "\n")
    return report.exit_code


def _cmd_baseline(args) -> int:
    from bench.baselines import update_baselines
    from bench.console import out

    for line in update_baselines(args.results, args.dest, force=args.force):
        out.print(line, highlight=False)
    return 0


def _write_text(path: str, text: str) -> None:
    from pathlib import Path

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(p)
    except OSError as e:
        raise UserError(f"cannot write {p}: {e.strerror}") from None


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
    c = sub.add_parser("compare", help="gate: compare candidate records with baseline records")
    c.add_argument("baseline", help="baseline record file or directory")
    c.add_argument("candidate", help="candidate record file or directory")
    c.add_argument("--tol", action="append", metavar="METRIC:TOL", help="tolerance, e.g. fid:5%% or accuracy:0.5")
    c.add_argument("--k", type=float, default=2.0, help="noise factor: regress only beyond k combined std errors")
    c.add_argument("--markdown", metavar="FILE", help="write the report as Markdown (for a PR comment)")
    c.add_argument("--json", metavar="FILE", help="write the report as JSON")
    c.set_defaults(fn=_cmd_compare)
    b = sub.add_parser("baseline", help="manage approved baseline records")
    bsub = b.add_subparsers(dest="action", required=True, parser_class=_Parser)
    bu = bsub.add_parser("update", help="approve records: copy them into baselines/<suite>/<data>/")
    bu.add_argument("results", help="record file or directory")
    bu.add_argument("--dest", default="baselines", help="baselines root (default: baselines)")
    bu.add_argument("--force", action="store_true", help="replace a baseline measured under another protocol")
    bu.set_defaults(fn=_cmd_baseline)
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
