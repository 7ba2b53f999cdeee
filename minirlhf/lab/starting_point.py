"""The SFT model an experiment starts from: read from a finished ``minirlhf sft`` folder, or trained here.

Training it here runs the ``sft`` stage itself (stages.py), with the demo's ``--quick`` task and, for a
quick experiment, ``QUICK_SFT_STEPS`` steps, into ``out/sft`` — a folder ``minirlhf sft`` would also
have written, so a second experiment can start from it with ``sft=out/sft``. A quick run's own SFT model
is a smoke test of the pipeline, not a policy worth studying: for findings, pass ``sft`` a full SFT folder.
"""
import os

from ..tasks.environment import AdditionEnvironment, TaskConfig
from ..train.stages import STAGES, Inputs, load_inputs, prepare_out, read_run, run_stage, stage_settings

QUICK_SFT_STEPS = 150  # what a quick run affords; the model gets ~2% of held-out sums right (400 steps: ~65%)


def starting_point(out, seed=0, quick=False, sft=None, progress=True):
    """``Inputs`` (environment, seed, SFT model) from the sft folder ``sft``, or from an SFT run made in
    ``out/sft`` (the quick preset's task; ``QUICK_SFT_STEPS`` steps when ``quick``)."""
    if sft is not None:
        run = read_run(sft, "sft")
        env = AdditionEnvironment(TaskConfig(**run["settings"]["TaskConfig"]), run["seed"])
        return load_inputs(env, run["seed"], sft)
    stage = STAGES["sft"]
    flags = {"seed": seed, "steps": QUICK_SFT_STEPS if quick else None}
    configs = stage_settings(stage, quick=True, flags=flags)
    folder = os.path.join(out, "sft")
    prepare_out(folder, "sft", overwrite=True)
    inputs = Inputs(AdditionEnvironment(configs[1], seed), seed)
    run_stage(stage, folder, inputs, configs, progress=progress)
    return inputs
