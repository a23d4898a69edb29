"""``make bench``: every benchmark section, in one run, printed as Markdown.

Sections are the modules ``benchmarks/bench_*.py``; each defines ``TITLE`` and
``run(quick)`` returning Markdown.  ``--only NAME`` runs the sections whose
module name contains NAME; ``--quick`` shrinks the problems (a smoke test).
"""
import argparse
import importlib
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import describe_machine  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", default=[], help="run sections whose name contains this")
    parser.add_argument("--quick", action="store_true", help="small problems, for a smoke test")
    args = parser.parse_args(argv)
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if any(o in n for o in args.only)]
    print(f"# torchnmf benchmarks\n\n{describe_machine()}\n", flush=True)
    for name in names:
        module = importlib.import_module(name)
        started = time.perf_counter()
        print(f"## {module.TITLE}\n", flush=True)
        print(module.run(quick=args.quick), flush=True)
        print(f"\n({name}: {time.perf_counter() - started:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
