"""``from_pretrained(dir)``: the model of any Hugging Face directory this package reads, by its architecture.

    GPT2LMHeadModel                                         → minirlhf.model.GPT
    LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM    → minirlhf.llama.Llama

Reading the files is ``minirlhf.hf``'s job; this picks the class. Nothing is downloaded.
"""
import numpy as np

from .hf import GPT2, architecture, read_hf_config
from .llama import Llama
from .model import GPT


def from_pretrained(path, dtype=np.float32):
    """The model of a Hugging Face directory: a GPT for GPT-2, a Llama for the Llama/Qwen family."""
    if architecture(read_hf_config(path), path) == GPT2:
        if np.dtype(dtype).type is not np.float32:
            raise ValueError(f"from_pretrained: GPT-2 loads in float32 only, got dtype {np.dtype(dtype)}")
        return GPT.from_pretrained(path)
    return Llama.from_pretrained(path, dtype)
