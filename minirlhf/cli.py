"""The ``minirlhf`` command: the demo, and each RLHF stage on the shipped addition task.

    minirlhf demo [--out DIR] [--quick] [--seed N]      every stage, results.json, a table and a plot
    minirlhf sft  --out runs/sft                          supervised fine-tuning of a fresh GPT
    minirlhf rm   --sft runs/sft --out runs/rm            reward model on preferences of the hidden rater
    minirlhf ppo  --sft runs/sft --rm runs/rm --out runs/ppo
    minirlhf grpo --sft runs/sft --out runs/grpo          (also dpo, rloo)

Each stage takes ``--config FILE.json`` and one flag per setting (``--lr``, ``--group-size``, ...;
flags win over the file, the file over the demo's defaults), ``--seed``, ``--resume`` (continue an
interrupted run from its last checkpoint), and writes to its ``--out`` folder: metrics.jsonl, the
checkpoint, the model, and eval.json (held-out accuracy, greedy accuracy, gold reward, KL to SFT).
"""
import argparse
import dataclasses
import json
import os
import sys

from . import backend


def _bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


SKIPPED = {"seed", "pad_id", "betas", "max_new_tokens"}  # set by the command itself, or not a plain value


def _add_config_flags(parser, cls):
    """One ``--flag`` per field of the config dataclass ``cls``; all default to None (= not given)."""
    group = parser.add_argument_group(f"{cls.__name__} settings (override --config)")
    for field in dataclasses.fields(cls):
        if field.name in SKIPPED:
            continue
        kind = type(field.default)
        kind = _bool if kind is bool else kind
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind, default=None,
                           help=f"default {field.default!r}")


def _stage_parser(sub, name, help, config_cls, needs_sft=True):
    p = sub.add_parser(name, help=help)
    p.add_argument("--out", required=True, help="folder for the checkpoint, metrics.jsonl, model and eval.json")
    if needs_sft:
        p.add_argument("--sft", required=True, help="folder written by `minirlhf sft`")
    p.add_argument("--config", help="JSON file of settings")
    p.add_argument("--seed", type=int, default=None, help="default: the seed of the SFT run (0 for sft)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    _add_config_flags(p, config_cls)
    return p


def build_parser():
    from .train.pipeline import TRAINER_CONFIGS
    from .train.sft import SFTConfig
    parser = argparse.ArgumentParser(prog="minirlhf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline on the shipped tasks")
    demo.add_argument("--out", default="minirlhf-demo")
    demo.add_argument("--quick", action="store_true", help="the same stages at test-suite size (well under a minute)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", dest="progress", action="store_false")

    sft = _stage_parser(sub, "sft", "supervised fine-tuning on demonstrations", SFTConfig, needs_sft=False)
    sft.add_argument("--quick", action="store_true", help="the demo's --quick task and model size")
    for name in ("n_layer", "n_head", "n_embd"):
        sft.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    helps = {"rm": "reward model (Bradley-Terry) on the hidden rater's preferences",
             "ppo": "PPO against a reward model, KL to the SFT model",
             "grpo": "GRPO on the rule reward", "dpo": "DPO on the hidden rater's preferences",
             "rloo": "REINFORCE leave-one-out on the rule reward"}
    for name, help in helps.items():
        p = _stage_parser(sub, name, help, TRAINER_CONFIGS[name])
        if name == "ppo":
            p.add_argument("--rm", required=True, help="folder written by `minirlhf rm`")
    return parser


def _overrides(args, cls):
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in SKIPPED and getattr(args, f.name, None) is not None}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def run_sft(args):
    from .train.common import load_config
    from .train.pipeline import AdditionEnvironment, demo_settings, evaluate, sft_stage
    from .train.sft import SFTConfig
    settings = demo_settings(args.quick)
    seed = 0 if args.seed is None else args.seed
    model_settings = {**settings["model"], **{k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd")
                                              if getattr(args, k) is not None}}
    sft_settings = dataclasses.asdict(load_config(SFTConfig, args.config, defaults=settings["sft"],
                                                  **_overrides(args, SFTConfig)))
    os.makedirs(args.out, exist_ok=True)
    env = AdditionEnvironment(**settings["task"], seed=seed)
    model, _ = sft_stage(env, model_settings, sft_settings, seed, args.out, resume=args.resume)
    model.save(os.path.join(args.out, "model"))
    env.tokenizer.save(os.path.join(args.out, "tokenizer"))
    _write_json(os.path.join(args.out, "run.json"), {"seed": seed, "quick": args.quick, "settings": settings})
    return evaluate(env, model, model, settings["eval_samples"], seed)


def _load_sft(folder):
    from .model import GPT
    from .train.pipeline import AdditionEnvironment
    path = os.path.join(folder, "run.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--sft {folder}: no run.json there; pass a folder written by `minirlhf sft`")
    with open(path) as f:
        run = json.load(f)
    env = AdditionEnvironment(**run["settings"]["task"], seed=run["seed"])
    return env, GPT.load(os.path.join(folder, "model")), run


def run_stage(args):
    from .model import RewardModel
    from .train.pipeline import evaluate, policy_stage, preference_stage, reward_stage, stage_config
    env, sft, run = _load_sft(args.sft)
    settings = run["settings"]
    seed = run["seed"] if args.seed is None else args.seed
    config = stage_config(args.command, settings, env, seed, args.config,
                          **_overrides(args, type(stage_config(args.command, settings, env, seed))))
    os.makedirs(args.out, exist_ok=True)
    if args.command in ("rm", "dpo"):
        train_pairs, heldout_pairs = preference_stage(env, sft, settings["preferences"], seed)
    if args.command == "rm":
        rm, _, metrics = reward_stage(env, sft, train_pairs, heldout_pairs, config, args.out, args.resume,
                                      args.progress)
        rm.save(os.path.join(args.out, "model"))
        return metrics
    reward_model = RewardModel.load(os.path.join(args.rm, "model")) if args.command == "ppo" else None
    policy, _ = policy_stage(args.command, env, sft, config, args.out, args.resume, args.progress,
                             reward_model=reward_model, pairs=train_pairs if args.command == "dpo" else None)
    policy.save(os.path.join(args.out, "model"))
    return evaluate(env, policy, sft, settings["eval_samples"], seed)


def main(argv=None):
    args = build_parser().parse_args(argv)
    backend.keep_freed_memory()
    try:
        if args.command == "demo":
            from .train.pipeline import run_demo
            run_demo(out=args.out, quick=args.quick, seed=args.seed, progress=args.progress)
            return 0
        metrics = run_sft(args) if args.command == "sft" else run_stage(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"minirlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    _write_json(os.path.join(args.out, "eval.json"), metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
