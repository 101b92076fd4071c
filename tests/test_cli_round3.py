"""`fisher-lora init` (round 3): files in --out that are not ours, --out inside --model, and bad input refused in
one line (exit 2) before the model is loaded, with nothing left behind."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_cli import COMMON, ENV, ROOT, fisher_lora
from tiny import DATA


def _refused(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert expected in line, line


def test_init_keeps_a_users_readme_and_report_png_in_out(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my adapter\n")
    (out / "report.png").write_bytes(b"my plot")
    for overwrite in ([], ["--overwrite"]):
        done = fisher_lora(
            "init", "--model", tiny_llama_dir, "--data", DATA / "text.jsonl", "--out", out, *COMMON, *overwrite
        )
        assert done.returncode == 0, done.stderr
        assert (out / "README.md").read_text() == "# my adapter\n"
        assert (out / "report.png").read_bytes() == b"my plot"
        assert (out / "adapter_model.safetensors").is_file()


def test_a_fresh_out_gets_peft_s_model_card(tiny_llama_dir, tmp_path):
    done = fisher_lora(
        "init", "--model", tiny_llama_dir, "--data", DATA / "text.jsonl", "--out", tmp_path / "o", *COMMON
    )
    assert done.returncode == 0, done.stderr
    assert "library_name: peft" in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.parametrize("inside", [".", "adapters/run1"])
def test_out_equal_to_or_inside_the_model_is_refused_before_loading(tiny_llama_dir, tmp_path, inside):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    done = fisher_lora("init", "--model", model, "--data", DATA / "text.jsonl", "--out", model / inside, *COMMON)
    _refused(done, "inside --model")
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\\u00e9 ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "q.jsonl").write_text('{"question": "?"}\n')
    (tmp_path / "cache_dir").mkdir()
    cases = {
        "not utf-8": (["--data", tmp_path / "latin1.jsonl"], "latin1.jsonl:2 is not UTF-8"),
        "unknown format": (
            ["--data", tmp_path / "q.jsonl"],
            "q.jsonl:1: cannot tell the data format from the keys "
            "['question']: expected 'text', 'prompt'+'completion' or 'messages'; pass --text-field "
            "FIELD or --chat",
        ),
        "bogus device": (["--device", "bogus"], "--device bogus: not a device name"),
        "meta device": (["--device", "meta"], "--device meta: this machine has no meta device"),
        "cache dir": (["--cache-path", tmp_path / "cache_dir"], "is a directory; pass a file path"),
        "preserve dropout": (["--policy", "preserve", "--lora-dropout", "0.1"], "preserve with --lora-dropout"),
    }
    if not torch.cuda.is_available():
        cases["cuda"] = (["--device", "cuda"], "--device cuda: this machine has no cuda device")
    else:
        cases["cuda index"] = (["--device", f"cuda:{torch.cuda.device_count()}"], "cuda device(s), numbered")
    return cases


@pytest.mark.parametrize(
    "case", ["not utf-8", "unknown format", "bogus device", "meta device", "cache dir", "preserve dropout", "cuda"]
)
def test_bad_input_is_one_line_and_leaves_no_out_behind(tiny_llama_dir, tmp_path, case):
    cases = _bad_input_cases(tmp_path)
    if case == "cuda" and case not in cases:
        case = "cuda index"
    args, expected = cases[case]
    out = tmp_path / "new" / "out"
    args = ["--data", DATA / "text.jsonl", *args] if "--data" not in args else args
    _refused(fisher_lora("init", "--model", tiny_llama_dir, *args, "--out", out, *COMMON), expected)
    assert not (tmp_path / "new").exists()


def _as_unprivileged(*args) -> subprocess.CompletedProcess:
    """`fisher-lora` as user `nobody` (root is not stopped by permission bits), or as we are if not root."""
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "fisher_core", *map(str, args)],
        capture_output=True, text=True, env={**ENV, "HOME": tempfile.gettempdir()}, cwd=ROOT, timeout=600,
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_a_writable_out_in_a_read_only_parent_is_refused_before_loading():
    base = Path(tempfile.mkdtemp())  # not under pytest's root-only tmp_path: `nobody` must reach it
    try:
        (base / "model").mkdir()
        shutil.copy(DATA / "text.jsonl", base / "data.jsonl")
        (base / "model" / "config.json").write_text("{}")  # refused before anything reads it
        (base / "parent" / "out").mkdir(parents=True)
        (base / "parent" / "out").chmod(0o777)
        for p in (base, base / "model", base / "parent"):
            p.chmod(0o555)
        for p in (base / "data.jsonl", base / "model" / "config.json"):
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        done = _as_unprivileged("init", "--model", base / "model", "--data", base / "data.jsonl", "--out",
                                base / "parent" / "out", *COMMON)  # fmt: skip
        _refused(done, f"--out {base / 'parent'}: cannot write in {base / 'parent'}")
        assert not list((base / "parent" / "out").iterdir())
    finally:
        for p in (base, base / "parent"):
            p.chmod(0o755)
        shutil.rmtree(base)
