"""`bench`: run suites, list what is registered, show tables.

    bench run [key=value ...]      e.g. bench run suite=hybrid models=[jem,wrn] data=digits scale=small
    bench run -m [key=a,b ...]     a sweep (Hydra multirun), e.g. bench run -m launcher=joblib models=jem,wrn seed=0,1
    bench list suites|models|datasets|metrics
    bench table cifar10|calibration|ood|RESULTS_DIR [--results DIR] [--format rich|markdown|latex|csv|html] [--out FILE]
    bench report [RESULTS_DIR] [--out report.html]
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

TABLE_FORMATS = ("rich", "markdown", "latex", "csv", "html")  # bench.results.tables.FORMATS, without importing it


def _cmd_run(args) -> int:
    if args.multirun:
        from bench.sweep import run_sweep

        return run_sweep(args.overrides)
    from bench import console
    from bench.config import load_config
    from bench.results.tables import print_run_table
    from bench.runner import run

    cfg = load_config(args.overrides)
    outcome = run(cfg)
    print_run_table([r for r, _ in outcome.records])
    for _, path in outcome.records:
        console.info(f"[dim]record: {path}[/dim]")
    return 1 if outcome.failed or outcome.unwritten else 0


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
            needs = ",".join([*m.requires, *(["|".join(m.requires_any)] if m.requires_any else [])])
            out.print(f"{n:<10} {m.arrow} unit={m.unit or '-':<3} requires={needs}", highlight=False)
    return 0


def _cmd_table(args) -> int:
    from bench.results.published import TABLES, published_view
    from bench.results.records import load_records
    from bench.results.tables import print_views, render_views, results_views

    if args.what in TABLES:
        # the default results/ may be empty on a fresh clone: the published numbers alone are still a table
        source = args.results or "results"
        views = [published_view(args.what, load_records(source, required=args.results is not None), source)]
    elif args.results is not None:
        raise UserError(f"--results goes with a published table ({', '.join(TABLES)}); "
                        f"for a results directory, give it alone: bench table {args.what}")
    elif not os.path.exists(args.what) and os.sep not in args.what:
        raise UserError(f"unknown table '{args.what}'; valid choices: {', '.join(TABLES)}, or a results directory")
    else:
        views = results_views(load_records(args.what))
    if args.out:
        _write_text(args.out, render_views(views, args.format))
    elif args.format == "rich":
        print_views(views)
    else:
        sys.stdout.write(render_views(views, args.format))
    return 0


def _cmd_report(args) -> int:
    from bench import console
    from bench.results.report import build_report

    text = build_report(args.results)
    _write_text(args.out, text)
    console.info(f"report: {args.out}")
    return 0


def _cmd_compare(args) -> int:
    import math

    from bench.console import out
    from bench.results import gate
    from bench.results.records import load_records
    from bench.results.tables import render

    overrides = gate.parse_tol_overrides(args.tol or [])
    if not (args.k >= 0 and math.isfinite(args.k)):
        raise UserError(f"--k must be a finite non-negative number, got {args.k}")
    report = gate.compare(load_records(args.baseline, "baseline"), load_records(args.candidate, "candidate"),
                          k=args.k, overrides=overrides, latest=args.latest)
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
    from bench.console import out
    from bench.results.baselines import update_baselines

    for line in update_baselines(args.results, args.dest, force=args.force, latest=args.latest):
        out.print(line, highlight=False)
    return 0


def _write_text(path: str, text: str) -> None:
    from bench.fileio import atomic_write_text

    atomic_write_text(path, text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        sys.stderr.write(f"bench: error: {message}; see 'bench --help'\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="Benchmark and evaluation harness for deep generative models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run a suite: bench run suite=hybrid models=[jem,wrn] scale=small")
    r.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    r.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: one job per combination of comma-separated values (Hydra multirun); "
                        "launcher=joblib|submitit_local|submitit_slurm runs the jobs in parallel")
    r.set_defaults(fn=_cmd_run)
    ls = sub.add_parser("list", help="list suites, models, datasets or metrics")
    ls.add_argument("what", choices=["suites", "models", "datasets", "metrics"])
    ls.set_defaults(fn=_cmd_list)
    t = sub.add_parser("table", help="a published table beside reproduced records, or every record in a directory")
    t.add_argument("what", help="cifar10 (JEM Table 1), calibration, ood, or a results directory (every record; "
                   "write ./cifar10 for a directory named like a table)")
    t.add_argument("--results", metavar="DIR", help="records to set beside a published table (default: results)")
    t.add_argument("--format", default="rich", choices=TABLE_FORMATS, help="output format (default: rich)")
    t.add_argument("--out", metavar="FILE", help="write the table to FILE (atomically) instead of stdout")
    t.set_defaults(fn=_cmd_table)
    rp = sub.add_parser("report", help="one self-contained HTML file: every table and figure of a results directory")
    rp.add_argument("results", nargs="?", default="results", help="results directory (default: results)")
    rp.add_argument("--out", default="report.html", metavar="FILE", help="HTML file to write (default: report.html)")
    rp.set_defaults(fn=_cmd_report)
    c = sub.add_parser("compare", help="gate: compare candidate records with baseline records")
    c.add_argument("baseline", help="baseline record file or directory")
    c.add_argument("candidate", help="candidate record file or directory")
    c.add_argument("--tol", action="append", metavar="METRIC:TOL", help="tolerance, e.g. fid:5%% or accuracy:0.5")
    c.add_argument("--k", type=float, default=2.0, help="noise factor: regress only beyond k combined std errors")
    c.add_argument("--markdown", metavar="FILE", help="write the report as Markdown (for a PR comment)")
    c.add_argument("--json", metavar="FILE", help="write the report as JSON")
    c.add_argument("--latest", action="store_true",
                   help="where a directory holds re-runs of one model and seed, use the latest (by finish time)")
    c.set_defaults(fn=_cmd_compare)
    b = sub.add_parser("baseline", help="manage approved baseline records")
    bsub = b.add_subparsers(dest="action", required=True, parser_class=_Parser)
    bu = bsub.add_parser("update", help="approve records: copy them into baselines/<suite>/<data>/")
    bu.add_argument("results", help="record file or directory")
    bu.add_argument("--dest", default="baselines", help="baselines root (default: baselines)")
    bu.add_argument("--force", action="store_true", help="replace a baseline measured under another protocol")
    bu.add_argument("--latest", action="store_true",
                    help="where RESULTS holds re-runs of one model and seed, approve the latest (by finish time)")
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
