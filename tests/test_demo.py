"""The demo's parts that decide what it compares: the two Axolotl runs differ only in the plugin, and the losses
it plots are the ones Axolotl logged. (The real-model Axolotl runs themselves: tests/integration/test_smollm2.py.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def test_the_two_runs_differ_only_in_the_plugin(tmp_path):
    from benchmarks.demo import RECIPE, run_configs

    args = argparse.Namespace(steps=3, lr=2e-3, seed=1, out=tmp_path)
    configs = {name: yaml.safe_load(path.read_text()) for name, path in run_configs(args, Path("/m")).items()}
    lora, fisher = configs["lora"], configs["fisher"]
    plugin = {k for k in fisher if k in ("plugins", "lora_init") or k.startswith("fisher_")}
    assert plugin and fisher["lora_init"] == "fisher" and not plugin & set(lora)
    assert {k: v for k, v in fisher.items() if k not in plugin | {"output_dir", "dataset_prepared_path"}} == {
        k: v for k, v in lora.items() if k not in {"output_dir", "dataset_prepared_path"}
    }
    assert (fisher["max_steps"], fisher["learning_rate"], fisher["seed"], fisher["base_model"]) == (3, 2e-3, 1, "/m")
    recipe = yaml.safe_load(RECIPE.read_text())
    assert fisher["sample_packing"] and recipe["datasets"][0]["type"] == "chat_template"
    assert Path(fisher["datasets"][0]["path"]).is_file()


def test_logged_losses_are_read_from_axolotls_log_lines():
    from benchmarks.demo import _LOSS

    log = "{'loss': '5.451', 'grad_norm': '0.91', 'learning_rate': '0'}\nnoise\n{'loss': '5.335', 'epoch': 1}"
    assert [float(x) for x in _LOSS.findall(log)] == [5.451, 5.335]
