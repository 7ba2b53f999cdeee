"""The ``minirlhf`` command: the demo, and each RLHF stage on the shipped addition task.

    minirlhf demo [--out DIR] [--quick] [--seed N]      every stage, results.json, a table and a plot
    minirlhf sft  --out runs/sft                          supervised fine-tuning of a fresh GPT
    minirlhf rm   --sft runs/sft --out runs/rm            reward model on preferences of the hidden rater
    minirlhf ppo  --sft runs/sft --rm runs/rm --out runs/ppo
    minirlhf grpo --sft runs/sft --out runs/grpo          (also dpo, rloo)
    minirlhf lab overoptimization --out DIR [--quick]    an experiment of minirlhf.lab

Each stage takes one flag per setting (``--lr``, ``--group-size``, ...; ``--help`` lists them with
the value a run uses), ``--config FILE.json`` (flags win over the file, the file over the defaults),
``--quick`` (the test-size preset), ``--resume`` (continue an interrupted run from its last
checkpoint) and ``--overwrite`` (replace a run in ``--out``), and writes to its ``--out`` folder:
run.json, metrics.jsonl, the checkpoint, the model, and eval.json.
"""
import argparse
import dataclasses
import json
import sys

from . import backend
from .distributed import replicas, world

# settings a later stage takes from the --sft run unless given
INHERITED = {"seed": "the --sft run's seed", "max_new_tokens": "the task's answer length, digits + 3 (5 for 2 digits)"}


def _bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse(kind, name):
    """The flag parser of a setting of type ``kind``; ``none`` also accepted where the default is None."""
    base = {"bool": _bool, "int": int, "float": float, "str": str}[kind]

    def parse(text):
        if text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: expected {kind}, got {text!r}") from None
    return parse


def _add_settings(parser, stage):
    """One ``--flag`` per field of the stage's config classes, its help the field's meaning and default."""
    from .train.config import setting_help
    for cls in stage.configs:
        meanings = setting_help(cls)
        group = parser.add_argument_group(f"{cls.__name__} settings")
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            default = f"default: {INHERITED[f.name]}" if stage.reads and f.name in INHERITED else f"default {f.default!r}"
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_parse(kind, f.name), default=None,
                               metavar=kind.upper(), help=f"{meanings.get(f.name, '')}; {default}")


def build_parser():
    from .train.stages import STAGES
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline on the shipped tasks")
    demo.add_argument("--out", default="minirlhf-demo", help="folder for results.json, the plot and one folder per "
                      "stage (default minirlhf-demo)")
    demo.add_argument("--quick", action="store_true", help="the same stages at test-suite size (under a minute)")
    demo.add_argument("--seed", type=_seed, default=0, help="default 0")
    demo.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    demo.add_argument("--no-progress", dest="progress", action="store_false")
    _add_replicas(demo)
    from .lab import EXPERIMENTS
    lab = sub.add_parser("lab", help="an experiment that reproduces a paper's figure (minirlhf.lab)")
    lab.add_argument("experiment", help=f"one of: {', '.join(EXPERIMENTS)}")
    lab.add_argument("--out", required=True, help="folder for results.json, report.md and the figures")
    lab.add_argument("--quick", action="store_true", help="the experiment at test-suite size")
    lab.add_argument("--seed", type=_seed, default=0, help="default 0")
    lab.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    lab.add_argument("--no-progress", dest="progress", action="store_false")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        p.add_argument("--out", required=True, help="folder for run.json, metrics.jsonl, checkpoint, model, eval.json")
        for read in stage.reads:
            p.add_argument(f"--{read}", required=True, help=f"folder written by `minirlhf {read}`")
        p.add_argument("--config", help="JSON file of settings (flags win over it)")
        p.add_argument("--quick", action="store_true", help="the demo's --quick preset for these settings")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
        _add_replicas(p)
        _add_settings(p, stage)
    return parser


def _add_replicas(parser):
    parser.add_argument("--replicas", type=_at_least(1), default=1, metavar="N",
                        help="train as N data-parallel threads of this process, each with one BLAS thread "
                        "(minirlhf.distributed.replicas): faster than one process on N cores from about 4 "
                        "layers x 256 wide, slower on the demo's small models; mpiexec -n N is faster "
                        "still; default 1")


def _at_least(minimum):
    """The parser of an integer flag that must be >= ``minimum``."""
    expected = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_seed = _at_least(0)


def run_stage_command(args):
    """``minirlhf <stage>``: settings from defaults, --quick, --config and flags; the run; its eval.json."""
    from .train.config import read_json
    from .train.stages import (STAGES, Inputs, environment, load_inputs, prepare_out, read_run, run_stage,
                               sft_environment, stage_settings)
    stage = STAGES[args.command]
    reads = {r: getattr(args, r) for r in stage.reads}
    file_values = read_json(args.config, "--config") if args.config else None
    flags = {f.name: getattr(args, f.name) for cls in stage.configs for f in dataclasses.fields(cls)}
    if stage.reads:
        sft_run = read_run(args.sft, "sft")
        env = sft_environment(args.sft, sft_run)
        inherited = {"seed": sft_run["seed"], "max_new_tokens": env.max_new_tokens}
        configs = stage_settings(stage, args.quick, file_values, flags, inherited)
        inputs = load_inputs(env, configs[0].seed, args.sft, reads.get("rm"))
    else:
        configs = stage_settings(stage, args.quick, file_values, flags)
        inputs = Inputs(environment(configs[1], configs[0].seed, configs[2].model), configs[0].seed)
    prepare_out(args.out, stage.name, args.resume, args.overwrite, reads=list(reads.items()))
    _, _, metrics = run_stage(stage, args.out, inputs, configs, resume=args.resume, progress=args.progress,
                              reads=reads)
    return metrics


def main(argv=None):
    args = build_parser().parse_args(argv)
    backend.keep_freed_memory()  # NumPy steps free and reuse big temporaries: fewer page faults (see backend)
    try:
        if args.command == "demo":
            from .train.demo import run_demo
            replicas(args.replicas, run_demo, out=args.out, quick=args.quick, seed=args.seed, progress=args.progress,
                     overwrite=args.overwrite)
            return 0
        if args.command == "lab":
            from .lab import EXPERIMENTS
            if args.experiment not in EXPERIMENTS:
                raise ValueError(f"unknown experiment {args.experiment!r}; expected one of {', '.join(EXPERIMENTS)}")
            EXPERIMENTS[args.experiment](out=args.out, quick=args.quick, seed=args.seed, progress=args.progress,
                                         overwrite=args.overwrite)
            return 0
        metrics = replicas(args.replicas, run_stage_command, args)
    except (ValueError, OSError) as e:
        print(f"minirlhf {args.command}: error: {e}", file=sys.stderr)
        if world().size > 1:
            world().abort(2)  # the other ranks would wait for this one forever
        return 2
    if world().rank == 0:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
