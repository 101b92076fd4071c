"""`fisher-lora init` / `report` run as subprocesses on the tiny local model and the shipped JSONL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import DATA

from fisher_core import FisherConfig, initialize
from fisher_core.data import load_batches

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = ["--rank", "4", "--batch-size", "4", "--max-length", "96", "--num-batches", "2", "--quiet"]


def fisher_lora(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fisher_core", *map(str, args)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600,
    )  # fmt: skip


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def in_process_lora_state(model_dir: Path, data: Path, config: FisherConfig, chat: bool = False):
    """`fisher_core.initialize` on the same model, data, tokenizer and config; returns (lora state, peft model)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    batches = load_batches(data, tokenizer, batch_size=4, num_batches=config.num_batches, chat=chat, max_length=96)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(load_model(model_dir), lora)
    initialize(peft_model, batches, config=config, tokenizer=tokenizer)
    return get_peft_model_state_dict(peft_model), peft_model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def preserve_dir(tiny_llama_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "adapter"
    args = ["--data", DATA / "sft.jsonl", "--out", out, "--policy", "preserve"]
    done = fisher_lora("init", "--model", tiny_llama_dir, *args, *COMMON)
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture(scope="module")
def zero_dir(tiny_llama_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli-zero")
    (tmp / "fisher.yaml").write_text("policy: zero\nselector: subspace\nnum_batches: 5\n")
    (tmp / "adapter" / "residual_base").mkdir(parents=True)  # an earlier run's output, replaced by --overwrite:
    (tmp / "adapter" / "fisher_stats.safetensors").write_bytes(b"stale")  # reusing it would fail
    args = ["--data", DATA / "chat.jsonl", "--chat", "--out", tmp / "adapter", "--config", tmp / "fisher.yaml"]
    done = fisher_lora("init", "--model", tiny_llama_dir, *args, *COMMON, "--overwrite")  # flags override the YAML
    assert done.returncode == 0, done.stderr
    return tmp / "adapter", done


def test_preserve_adapter_matches_in_process_initialize(preserve_dir, tiny_llama_dir):
    out, _ = preserve_dir
    expected, _ = in_process_lora_state(
        tiny_llama_dir, DATA / "sft.jsonl", FisherConfig(num_batches=2, progress=False, policy="preserve")
    )
    written = load_file(out / "adapter_model.safetensors")
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=1e-6, msg=key)
    assert any(v.abs().sum() > 0 for k, v in written.items() if "lora_B" in k)


def test_preserve_adapter_loads_with_peft_on_the_residual_base_and_keeps_outputs(preserve_dir, tiny_llama_dir):
    from peft import PeftConfig, PeftModel

    out, done = preserve_dir
    assert "train on the residual base" in done.stdout and str((out / "residual_base").resolve()) in done.stdout
    assert PeftConfig.from_pretrained(out).base_model_name_or_path == str((out / "residual_base").resolve())
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    original = logits(load_model(tiny_llama_dir), ids)
    trained_start = PeftModel.from_pretrained(load_model(out / "residual_base"), out, is_trainable=True)
    torch.testing.assert_close(logits(trained_start, ids), original, rtol=0, atol=1e-5)
    wrong_base = PeftModel.from_pretrained(load_model(tiny_llama_dir), out)
    assert not torch.allclose(logits(wrong_base, ids), original, atol=1e-5)
    assert (out / "fisher_init.safetensors").is_file()


def test_zero_adapter_matches_in_process_and_loads_on_the_original_base(zero_dir, tiny_llama_dir):
    from peft import PeftModel

    out, done = zero_dir
    assert "train on the original base" in done.stdout and not (out / "residual_base").exists()
    config = FisherConfig(policy="zero", selector="subspace", num_batches=2, progress=False)
    expected, _ = in_process_lora_state(tiny_llama_dir, DATA / "chat.jsonl", config, chat=True)
    written = load_file(out / "adapter_model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=1e-6, msg=key)
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    loaded = PeftModel.from_pretrained(load_model(tiny_llama_dir), out)
    torch.testing.assert_close(logits(loaded, ids), logits(load_model(tiny_llama_dir), ids), rtol=0, atol=1e-6)


def test_quiet_init_shows_no_progress_bars(preserve_dir):
    _, done = preserve_dir
    assert "it/s" not in done.stderr and "batch/s" not in done.stderr
    assert "statistics cached" in done.stderr  # log lines with numbers stay


def test_report_png_has_every_panel_drawn(preserve_dir, tmp_path):
    out, _ = preserve_dir
    done = fisher_lora("report", out, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    image = Image.open(tmp_path / "report.png").convert("RGB")
    assert list(image.size) == report["figure"]["size"] == [1400, 1300]
    assert set(report["figure"]["panels"]) == {"mass", "spectrum_S_A", "spectrum_S_G", "ranks", "captured"}
    for name, box in report["figure"]["panels"].items():
        pixels = torch.tensor(list(image.crop(box).getdata()))
        coloured = (pixels.amax(dim=1) - pixels.amin(dim=1) > 60).float().mean()  # data: bars, lines
        inked = (pixels < 128).any(dim=1).float().mean()  # axes, ticks, labels
        assert coloured > 0.002 and inked > 0.002, f"panel {name} looks blank ({coloured:.4f}, {inked:.4f})"
    layers = report["layers"]
    assert len(layers) == 4 and all({"fisher_mass", "rank", "captured"} <= set(v) for v in layers.values())
    top = report["top_layers"][0]
    assert layers[top]["fisher_mass"] == max(v["fisher_mass"] for v in layers.values())
    assert len(layers[top]["eig_S_A"]) == 32 and layers[top]["eig_S_A"][0] >= layers[top]["eig_S_A"][-1]
    assert report["selector"] == "natural"  # what init wrote is kept


def test_report_on_a_bare_statistics_file(zero_dir, tmp_path):
    stats = tmp_path / "stats.safetensors"
    shutil.copyfile(zero_dir[0] / "fisher_stats.safetensors", stats)
    done = fisher_lora("report", stats)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "report.png").size == (1400, 1300)
    layers = json.loads((tmp_path / "report.json").read_text())["layers"]
    assert len(layers) == 4 and all("fisher_mass" in v and "rank" not in v for v in layers.values())


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--num-batches", "0", "--num-batches: Input should be greater than or equal to 1"),
        ("--selector", "bogus", "--selector: Input should be 'select', 'fwsvd', 'natural' or 'subspace'"),
        ("--mc-samples", "4", "mc_samples > 1 only applies to fisher_type='true'"),
    ],
)
def test_bad_flag_value_exits_2_with_one_line_naming_it(tiny_llama_dir, tmp_path, flag, value, expected):
    done = fisher_lora("init", "--model", tiny_llama_dir, "--data", DATA / "text.jsonl", "--out", tmp_path, flag, value)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expected in done.stderr


def test_unknown_yaml_key_exits_2_naming_the_file(tiny_llama_dir, tmp_path):
    (tmp_path / "fisher.yaml").write_text("selektor: natural\n")
    args = ["--data", DATA / "text.jsonl", "--out", tmp_path / "a", "--config", tmp_path / "fisher.yaml"]
    done = fisher_lora("init", "--model", tiny_llama_dir, *args)
    assert done.returncode == 2 and "fisher.yaml: key 'selektor': unknown field" in done.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
        (["--data", DATA / "text.jsonl", "--model", "no-such-model"], "--model no-such-model: no config.json"),
    ],
)
def test_missing_file_exits_2_with_one_line(tiny_llama_dir, tmp_path, args, expected):
    done = fisher_lora("init", "--model", tiny_llama_dir, "--out", tmp_path, *args)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("fisher-lora init: error: ") and expected in line


def test_existing_adapter_is_not_overwritten_without_the_flag(preserve_dir, tiny_llama_dir):
    out, _ = preserve_dir
    done = fisher_lora("init", "--model", tiny_llama_dir, "--data", DATA / "sft.jsonl", "--out", out)
    assert done.returncode == 2 and "--overwrite" in done.stderr


def test_report_of_a_missing_source_exits_2(tmp_path):
    done = fisher_lora("report", tmp_path)
    assert done.returncode == 2 and "fisher_stats.safetensors: no such file" in done.stderr


def test_preserve_output_exports_a_trained_adapter_for_the_original_base(preserve_dir, tiny_llama_dir, tmp_path):
    """The docs' route: train on residual_base/, then restore_offsets + export_adapter for the original base."""
    from peft import PeftModel

    from fisher_core import export_adapter
    from fisher_core.write import load_record, restore_offsets

    out, _ = preserve_dir
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    trained = PeftModel.from_pretrained(load_model(out / "residual_base"), out, is_trainable=True)
    with torch.no_grad():  # stands in for training
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    trained.save_pretrained(tmp_path / "trained")
    model = PeftModel.from_pretrained(load_model(tiny_llama_dir), tmp_path / "trained")
    restore_offsets(model, load_record(out))
    export_adapter(model, tmp_path / "shipped")
    shipped = PeftModel.from_pretrained(load_model(tiny_llama_dir), tmp_path / "shipped")
    torch.testing.assert_close(logits(shipped, ids), logits(trained, ids), rtol=0, atol=1e-5)
    # the same route as one command (what a sharded training run's log tells the user to run)
    args = ["--model", tiny_llama_dir, "--adapter", tmp_path / "trained", "--out", tmp_path / "cli"]
    done = fisher_lora("export", *args, "--record", out)
    assert done.returncode == 0, done.stderr
    shipped = PeftModel.from_pretrained(load_model(tiny_llama_dir), tmp_path / "cli")
    torch.testing.assert_close(logits(shipped, ids), logits(trained, ids), rtol=0, atol=1e-5)
    again = fisher_lora("export", *args, "--record", out)  # nothing is overwritten without the flag
    assert again.returncode == 2 and "--overwrite" in again.stderr
    no_record = fisher_lora("export", *args, "--overwrite")  # the trained dir alone carries no record
    assert no_record.returncode == 2 and "fisher_init.safetensors: no such file" in no_record.stderr


def test_overwrite_keeps_the_previous_output_when_the_new_run_fails(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", tiny_llama_dir, "--data", DATA / "text.jsonl", "--out", out, "--policy", "preserve", *COMMON]
    assert fisher_lora("init", *args).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    done = fisher_lora("init", *args, "--overwrite", "--rank-budget", "1")  # refused once the model is loaded
    assert done.returncode == 2, done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / "residual_base" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind


def test_sigint_during_init_leaves_no_half_written_output_and_a_rerun_works(tiny_llama_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    args = ["init", "--model", tiny_llama_dir, "--data", DATA / "text.jsonl", "--out", out, *COMMON]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fisher_core", *map(str, args)], env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None:  # interrupt once it has begun to write
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert not (out / "adapter_config.json").exists() or (out / "report.json").exists()  # all or nothing
    assert not list(tmp_path.glob(".out.*"))
    assert fisher_lora(*args, "--overwrite").returncode == 0


@pytest.mark.parametrize(
    ("extra", "yaml", "expected"),
    [
        ([], "cache_path: null\n", None),  # null means the default
        (["--cache-path", ""], None, "--cache-path: empty"),
        (["--cache-path", "FILE/stats.safetensors"], None, "cache_path"),
    ],
)
def test_cache_path_edge_cases_are_one_line_before_the_pass(tiny_llama_dir, tmp_path, extra, yaml, expected):
    (tmp_path / "FILE").write_text("a regular file")
    extra = [e.replace("FILE", str(tmp_path / "FILE")) for e in extra]
    if yaml is not None:
        (tmp_path / "f.yaml").write_text(yaml)
        extra += ["--config", tmp_path / "f.yaml"]
    done = fisher_lora(
        "init", "--model", tiny_llama_dir, "--data", DATA / "text.jsonl", "--out", tmp_path / "o", *COMMON, *extra
    )
    if expected is None:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert expected in line


def test_out_under_a_regular_file_is_refused_before_the_pass(tiny_llama_dir, tmp_path):
    (tmp_path / "FILE").write_text("a regular file")
    done = fisher_lora(
        "init", "--model", tiny_llama_dir, "--data", DATA / "text.jsonl", "--out", tmp_path / "FILE" / "o", *COMMON
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "--out" in line and "cannot create" in line


def test_report_without_matplotlib_exits_2_naming_the_extra(zero_dir, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()  # a site hook that makes `import matplotlib` fail, as on an install without the extra
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    env = {**ENV, "PYTHONPATH": f"{blocker}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    out, _ = zero_dir
    done = subprocess.run(
        [sys.executable, "-m", "fisher_core", "report", str(out), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = [x for x in done.stderr.strip().splitlines() if "fisher-lora" in x]
    assert "pip install 'fisher-lora[report]'" in line


def test_export_with_a_record_from_another_target_set_exits_2(preserve_dir, tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    out, _ = preserve_dir
    other = get_peft_model(load_model(tiny_llama_dir), LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"]))
    other.save_pretrained(tmp_path / "other")  # an adapter on o_proj; the record names q/v layers
    done = fisher_lora("export", "--model", tiny_llama_dir, "--adapter", tmp_path / "other", "--record", out,
                       "--out", tmp_path / "shipped")  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = [x for x in done.stderr.strip().splitlines() if x.startswith("fisher-lora export: error")]
    assert "different runs (or target sets)" in line
    assert not (tmp_path / "shipped").exists()


def test_keep_knowledge_generates_with_the_models_tokenizer_and_keeps_both_statistics(tiny_llama_dir, tmp_path):
    """The default (`auto`) on a chat model keeps its own answers; `--no-keep-knowledge` turns it off."""
    out = tmp_path / "adapter"
    args = ["--data", DATA / "sft.jsonl", "--out", out]
    done = fisher_lora("init", "--model", tiny_llama_dir, *args, *COMMON)
    assert done.returncode == 0, done.stderr
    assert "keep_knowledge 'auto' is on: a chat model" in done.stderr
    assert "Fisher (zero) relative to the keep data's Fisher" in done.stderr
    assert (out / "fisher_stats.safetensors").is_file() and (out / "fisher_stats.keep.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["keep_knowledge"] is True and report["init"]["config"]["keep_knowledge"] == "auto"
    off = tmp_path / "off"
    done = fisher_lora("init", "--model", tiny_llama_dir, *args[:-1], off, "--no-keep-knowledge", *COMMON)
    assert done.returncode == 0, done.stderr
    assert "keep data" not in done.stderr and not (off / "fisher_stats.keep.safetensors").exists()
    assert json.loads((off / "report.json").read_text())["keep_knowledge"] is False
