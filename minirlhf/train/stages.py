"""The stages of the pipeline, in order, and how each one is run: the registry that the
``minirlhf`` command and the demo both use.

    sft    a fresh GPT fine-tuned on demonstrations          reads nothing
    rm     reward model on the hidden rater's preferences     reads sft
    ppo    PPO against the reward model, KL to SFT            reads sft, rm
    grpo   GRPO on the rule reward                            reads sft
    dpo    DPO on the hidden rater's preferences              reads sft
    rloo   REINFORCE leave-one-out on the rule reward         reads sft

A stage's settings are the fields of its config classes (one flag each); ``QUICK`` holds the
overrides of ``--quick``, which runs the same code at the size a test can afford.
A stage's folder holds run.json (what ran, with which settings, from which folders), metrics.jsonl,
checkpoint/, model/ and eval.json; a later stage reads the task, the tokenizer and the SFT model
back from the sft folder, so ``minirlhf rm --sft DEMO/sft`` continues from a demo's stage.
"""
import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable

from .. import backend
from ..checkpoint import read_config
from ..distributed import world
from ..llama import Llama, LlamaRewardModel
from ..model import GPT, GPTConfig, RewardModel
from ..pretrained import from_pretrained
from ..tokenizer_json import HFTokenizer
from ..tasks.environment import AdditionEnvironment, PreferenceConfig, TaskConfig
from ..validation import is_positive_int, require
from .config import make_configs, read_json
from .dpo import DPOConfig, train_dpo
from .evaluate import evaluate_policy
from .grpo import GRPOConfig, train_grpo
from .ppo import PPOConfig, train_ppo, with_value_head
from .reward import RewardConfig, normalize_reward_model, pair_accuracy, pair_batch, train_reward_model
from .rloo import RLOOConfig, train_rloo
from .sft import SFTConfig, train_sft


@dataclass
class ModelConfig:
    """The GPT that SFT starts from (every later stage keeps its shape)."""
    n_layer: int = 2               # transformer blocks
    n_head: int = 4                # attention heads
    n_embd: int = 64               # width of the residual stream
    block_size: int = 32           # longest sequence, prompt and response together
    model: str = None              # a Hugging Face directory (Llama, Qwen2, Qwen3, GPT-2) to start from instead

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            require(self, name, is_positive_int, "a positive integer")
        require(self, "model", lambda v: v is None or os.path.isdir(v), "None or a Hugging Face model folder")


@dataclass
class Inputs:
    """What a stage starts from: the environment, the seed, the earlier stages' models, and the
    preference pairs (made once per preference setting, shared by rm and dpo)."""
    env: AdditionEnvironment
    seed: int
    sft: GPT = None
    rm: RewardModel = None
    pairs: dict = field(default_factory=dict)

    def preference_pairs(self, config):
        key = json.dumps(asdict(config), sort_keys=True)
        if key not in self.pairs:
            self.pairs[key] = self.env.preference_pairs(self.sft, config, self.seed)
        return self.pairs[key]

    def evaluate(self, policy):
        env = self.env
        return evaluate_policy(policy, self.sft, env.heldout_prompts, env.rule_reward("heldout"),
                               env.gold_score("heldout"), env.eos_id, env.pad_id, env.max_new_tokens,
                               env.config.eval_samples, seed=self.seed + 17)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    configs: tuple                 # config classes whose fields are the stage's settings; the first is the trainer's
    reads: tuple                   # earlier stages whose folders it starts from
    train: Callable                # train(inputs, *configs, out_dir, resume, progress) -> (model, history, metrics)


def environment(task, seed, model_dir=None):
    """The task's environment; with a pretrained model, its own tokenizer (chat template, end of turn)."""
    return AdditionEnvironment(task, seed, None if model_dir is None else HFTokenizer.load(model_dir))


def train_sft_stage(inputs, config, task, size, out_dir, resume, progress):
    backend.manual_seed(inputs.seed)
    env = inputs.env
    if size.model is not None:
        model = from_pretrained(size.model)
    else:
        model = GPT(GPTConfig(vocab_size=env.tokenizer.vocab_size, n_layer=size.n_layer, n_head=size.n_head,
                              n_embd=size.n_embd, block_size=size.block_size))
    demos = env.demonstrations(config.steps * config.batch_size, inputs.seed)
    history = train_sft(model, demos, config, env.pad_id, out_dir=out_dir, resume=resume,
                        log=os.path.join(out_dir, "metrics.jsonl"), progress=progress)
    inputs.sft = model
    return model, history, inputs.evaluate(model)


def train_rm_stage(inputs, config, preferences, out_dir, resume, progress):
    train_pairs, heldout_pairs = inputs.preference_pairs(preferences)
    rm = (LlamaRewardModel if isinstance(inputs.sft, Llama) else RewardModel).from_gpt(inputs.sft)
    history = train_reward_model(rm, train_pairs, config, inputs.env.pad_id, out_dir=out_dir, resume=resume,
                                 log=os.path.join(out_dir, "metrics.jsonl"), progress=progress)
    normalize_reward_model(rm, *pair_batch(train_pairs, inputs.env.pad_id))
    inputs.rm = rm
    return rm, history, {"pair_accuracy": pair_accuracy(rm, heldout_pairs, inputs.env.pad_id),
                         "train_pairs": len(train_pairs), "heldout_pairs": len(heldout_pairs)}


def train_ppo_stage(inputs, config, out_dir, resume, progress):
    env = inputs.env
    policy = with_value_head(inputs.sft)
    history = train_ppo(policy, inputs.sft, inputs.rm, env.train_prompts, config, env.eos_id, env.pad_id,
                        out_dir=out_dir, resume=resume, log=os.path.join(out_dir, "metrics.jsonl"), progress=progress)
    return policy, history, inputs.evaluate(policy)


def train_on_rule_reward(train):
    """A stage that trains a copy of the SFT model with ``train`` (GRPO, RLOO) on the rule reward."""
    def train_stage(inputs, config, out_dir, resume, progress):
        env = inputs.env
        policy = inputs.sft.copy()
        history = train(policy, inputs.sft, env.train_prompts, env.rule_reward("train"), config, env.eos_id,
                        env.pad_id, out_dir=out_dir, resume=resume, log=os.path.join(out_dir, "metrics.jsonl"),
                        progress=progress)
        return policy, history, inputs.evaluate(policy)
    return train_stage


def train_dpo_stage(inputs, config, preferences, out_dir, resume, progress):
    train_pairs, _ = inputs.preference_pairs(preferences)
    policy = inputs.sft.copy()
    history = train_dpo(policy, inputs.sft, train_pairs, config, inputs.env.pad_id, out_dir=out_dir, resume=resume,
                        log=os.path.join(out_dir, "metrics.jsonl"), progress=progress)
    return policy, history, inputs.evaluate(policy)


STAGES = {s.name: s for s in (
    Stage("sft", "supervised fine-tuning of a fresh GPT on demonstrations", (SFTConfig, TaskConfig, ModelConfig),
          (), train_sft_stage),
    Stage("rm", "reward model (Bradley-Terry) on the hidden rater's preferences", (RewardConfig, PreferenceConfig),
          ("sft",), train_rm_stage),
    Stage("ppo", "PPO against a reward model, KL to the SFT model", (PPOConfig,), ("sft", "rm"), train_ppo_stage),
    Stage("grpo", "GRPO on the rule reward", (GRPOConfig,), ("sft",), train_on_rule_reward(train_grpo)),
    Stage("dpo", "DPO on the hidden rater's preferences", (DPOConfig, PreferenceConfig), ("sft",), train_dpo_stage),
    Stage("rloo", "REINFORCE leave-one-out on the rule reward", (RLOOConfig,), ("sft",),
          train_on_rule_reward(train_rloo)),
)}

# ``--quick``: the same stages at the size a test can afford (overrides of the defaults above)
QUICK = {
    "TaskConfig": {"n_heldout": 100, "n_train_prompts": 1000},
    "PreferenceConfig": {"pair_prompts": 400, "pair_samples": 4, "pair_heldout_prompts": 100},
    "RewardConfig": {"steps": 400},
    "PPOConfig": {"steps": 50, "prompts_per_step": 64},
    "GRPOConfig": {"steps": 80},
    "DPOConfig": {"steps": 120, "batch_size": 32},
    "RLOOConfig": {"steps": 80},
}


def stage_settings(stage, quick=False, file_values=None, flags=None, inherited=None):
    """The flat settings of ``stage``: defaults ← ``inherited`` (seed, max_new_tokens from the task) ←
    ``--quick`` ← the JSON file ← flags. Returns the config objects, in ``stage.configs`` order."""
    known = {f.name for cls in stage.configs for f in dataclasses.fields(cls)}
    values = {k: v for k, v in (inherited or {}).items() if k in known}
    if quick:
        for cls in stage.configs:
            values.update(QUICK.get(cls.__name__, {}))
    values.update(file_values or {})
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return make_configs(stage.configs, values)


# ------------------------------------------------------------------ folders
RUN_FILES = ("run.json", "metrics.jsonl", "checkpoint", "model", "tokenizer", "eval.json")


def prepare_folder(out, overwrite, what):
    """The folder of a demo or a lab experiment (``what`` names it in the error): new, empty, or (with
    ``overwrite``) a previous one, whose files the run replaces."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; expected a folder")
    entries = os.listdir(out) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise ValueError(f"--out {out} is not empty (it holds {', '.join(sorted(entries)[:4])}...); pass "
                         f"--overwrite to replace a previous {what} there, or choose another folder")
    world().barrier()  # every rank has looked at the folder before rank 0 makes it
    if world().rank == 0:
        os.makedirs(out, exist_ok=True)
    world().barrier()


def prepare_out(out_dir, stage_name, resume=False, overwrite=False, reads=()):
    """Make ``out_dir`` ready for a run of ``stage_name``, refusing to destroy another run.

    A folder that holds a run continues only with ``resume`` (and only a run of the same stage);
    ``overwrite`` replaces a run's files (and only those); a folder the stage reads is never written.
    """
    out = os.path.abspath(out_dir)
    for name, folder in reads:
        if folder is not None and os.path.abspath(folder) == out:
            raise ValueError(f"--out {out_dir} is the --{name} folder this stage reads; choose another folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file; expected a folder (new or empty, or a run to --resume)")
    entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if entries and not overwrite:
        if not os.path.exists(os.path.join(out_dir, "run.json")):
            raise ValueError(f"--out {out_dir} holds files that are not a minirlhf run; choose an empty folder "
                             "(or pass --overwrite)")
        held = read_json(os.path.join(out_dir, "run.json"), "run file").get("stage")
        if not resume:
            raise ValueError(f"--out {out_dir} holds a {held} run; pass --resume to continue it, or --overwrite to "
                             "replace it")
        if held != stage_name:
            raise ValueError(f"--out {out_dir} holds a {held} run, not a {stage_name} run; it cannot be resumed "
                             "as one")
    world().barrier()  # every rank has checked the folder before rank 0 changes it
    if overwrite and world().rank == 0:
        for name in RUN_FILES:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    if world().rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    world().barrier()


def write_json(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file renamed into place); data parallel,
    rank 0 writes."""
    if world().rank != 0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_stage(stage, out_dir, inputs, configs, resume=False, progress=True, reads=None):
    """Train ``stage`` into ``out_dir`` with ``configs`` (from :func:`stage_settings`); write run.json,
    the model and eval.json; return (model, history, metrics)."""
    record = {"stage": stage.name, "seed": inputs.seed, "finished": False, "reads": reads or {},
              "settings": {cls.__name__: asdict(c) for cls, c in zip(stage.configs, configs)}}
    write_json(os.path.join(out_dir, "run.json"), record)
    root = world().rank == 0
    if stage.name == "sft" and root:
        inputs.env.tokenizer.save(os.path.join(out_dir, "tokenizer"))
    model, history, metrics = stage.train(inputs, *configs, out_dir=out_dir, resume=resume, progress=progress)
    if root:
        model.save(os.path.join(out_dir, "model"))
    write_json(os.path.join(out_dir, "eval.json"), metrics)
    write_json(os.path.join(out_dir, "run.json"), {**record, "finished": True})
    return model, history, metrics


MODEL_CLASSES = {cls.__name__: cls for cls in (GPT, Llama, RewardModel, LlamaRewardModel)}


def load_model(directory):
    """The model saved in ``directory``, of the class its config.json names."""
    name = read_config(directory).get("architecture")
    if name not in MODEL_CLASSES:
        raise ValueError(f"{directory}/config.json names architecture {name!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name].load(directory)


def sft_environment(sft_dir, sft_run):
    """The environment an sft run trained in: its task and seed, and its tokenizer when it was a pretrained one."""
    task = TaskConfig(**sft_run["settings"]["TaskConfig"])
    pretrained = sft_run["settings"].get("ModelConfig", {}).get("model") is not None
    tokenizer = HFTokenizer.load(os.path.join(sft_dir, "tokenizer")) if pretrained else None
    return AdditionEnvironment(task, sft_run["seed"], tokenizer)


def load_inputs(env, seed, sft_dir, rm_dir=None):
    """The models of finished runs (the SFT policy, and the reward model when given) as a stage's inputs."""
    inputs = Inputs(env, seed)
    inputs.sft = load_model(os.path.join(sft_dir, "model"))
    if rm_dir is not None:
        read_run(rm_dir, "rm")
        inputs.rm = load_model(os.path.join(rm_dir, "model"))
    return inputs


def read_run(folder, stage_name):
    """run.json of a finished ``stage_name`` run in ``folder``; errors say what is wrong with the folder."""
    path = os.path.join(folder, "run.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{stage_name} {folder}: no run.json there; pass a folder written by "
                                f"`minirlhf {stage_name}`")
    run = read_json(path, f"--{stage_name} run file")
    if run.get("stage") != stage_name:
        raise ValueError(f"--{stage_name} {folder}: run.json says it holds a {run.get('stage')!r} run, not {stage_name}")
    if not run.get("finished"):
        raise ValueError(f"--{stage_name} {folder}: the {stage_name} run there has not finished; resume it first "
                         f"(minirlhf {stage_name} --out {folder} --resume ...)")
    if stage_name == "sft":
        settings = run.get("settings")
        if not isinstance(settings, dict) or "TaskConfig" not in settings or not isinstance(run.get("seed"), int):
            raise ValueError(f"--sft {folder}: run.json lacks the task settings or the seed")
    return run
