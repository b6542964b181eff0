"""``kd-table``: a paper-style table of a sweep's runs, mean ± std over seeds.

The table is built by ``kd.sweeps.table`` (what a cell holds, how runs are grouped, the
baseline difference: see there); this module parses the command line and writes the files.

Examples:
    kd-table outputs/multiruns/2025-01-01/12-00-00                     # rows student, cols method
    kd-table SWEEP --rows temperature --cols method --format md,tex,csv --out paper/
    kd-table SWEEP --cols method --rows student,seed --final
    kd-table SWEEP --out plots/ --plot temperature --plot heatmap
    kd-table --wandb my-team/kd --rows student --cols method
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd.results import _write_atomic
from kd.sweeps.formats import to_csv, to_latex, to_markdown, unlisted
from kd.sweeps.runs import TableError, find_runs, wandb_runs
from kd.sweeps.table import build_table

FORMATS = {"md": "table.md", "tex": "table.tex", "csv": "table.csv"}
PLOTS = ("temperature", "heatmap")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _keys(values: list[str] | None, default: str) -> list[str]:
    return [k.strip() for v in (values or [default]) for k in v.split(",") if k.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="kd-table", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Examples:" + __doc__.split("Examples:")[1])
    p.add_argument("dirs", nargs="*", help="sweep or run directories, or parents of them (searched recursively)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of this W&B project instead")
    p.add_argument("--rows", action="append", help="row key(s), repeatable or comma separated (default: student)")
    p.add_argument("--cols", action="append", help="column key(s) (default: method)")
    p.add_argument("--metric", default="test/acc", help="the student's metric (default: test/acc)")
    p.add_argument("--final", action="store_true", help="the final epoch's metrics instead of the best-val checkpoint's")
    p.add_argument("--baseline", default=None, help="method to diff against (default: none if present; '' disables)")
    p.add_argument("--published", metavar="KEY", help="a row of the paper's numbers, from this config mapping "
                   "of column label -> number (pair.published)")
    p.add_argument("--no-teacher", dest="teacher", action="store_false", help="leave out the teacher row")
    p.add_argument("--format", default="md", help="md, tex, csv, comma separated (default: md)")
    p.add_argument("--out", type=Path, help="write table.<format> (and the plots) into this directory")
    p.add_argument("--plot", action="append", choices=PLOTS, help="PNG plots into --out: temperature, heatmap")
    args = p.parse_args(argv)
    args.rows, args.cols = _keys(args.rows, "student"), _keys(args.cols, "method")
    args.format = _keys([args.format], "md")
    bad = [f for f in args.format if f not in FORMATS]
    if bad:
        p.error(f"unknown format {bad[0]!r} (choose from {', '.join(FORMATS)})")
    if bool(args.dirs) == bool(args.wandb):
        p.error("give sweep directories or --wandb ENTITY/PROJECT (one of them)")
    if args.plot and args.out is None:
        p.error("--plot writes PNG files: give --out DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """``kd-table``: prints the table (and writes it, and the plots, into ``--out``); exit status 2 on bad input."""
    args = parse_args(argv)
    try:
        runs = wandb_runs(args.wandb) if args.wandb else find_runs(args.dirs)
        table = build_table(runs, args.rows, args.cols, metric=args.metric, final=args.final,
                            baseline=args.baseline, teacher=args.teacher, published=args.published)
        texts = {"md": to_markdown, "tex": to_latex, "csv": to_csv}
        if args.out is None:
            print("\n".join(texts[f](table) for f in args.format), end="")
            if "md" not in args.format and table.skipped:  # the Markdown lists them; the others must not hide them
                print("\n".join(f"kd-table: not in the table: {line}" for line in unlisted(table)), file=sys.stderr)
            return 0
        written = []
        for f in args.format:
            text = texts[f](table)
            _write_atomic(args.out / FORMATS[f], lambda fh, t=text: fh.write(t.encode()))
            written.append(args.out / FORMATS[f])
        if args.plot:
            from kd.sweeps import plots

            written += [plots.PLOTTERS[name](runs, args.out / f"{name}.png", metric=args.metric, final=args.final)
                        for name in dict.fromkeys(args.plot)]
    except TableError as e:
        print(f"kd-table: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(to_markdown(table), end="")
    print("\n".join(f"wrote {p}" for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
