"""The ``minirlhf`` command."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline on the shipped tasks")
    demo.add_argument("--out", default="minirlhf-demo")
    demo.add_argument("--quick", action="store_true")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .train.pipeline import run_demo
        run_demo(out=args.out, quick=args.quick, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
