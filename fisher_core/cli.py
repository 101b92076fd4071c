"""`fisher-lora`: initialize a LoRA adapter from a local model and a JSONL file, and plot what it chose.

    fisher-lora init --model DIR --data FILE.jsonl --rank 16 --targets q_proj,v_proj --out ADAPTER_DIR
    fisher-lora report ADAPTER_DIR
    fisher-lora export --model ORIGINAL_DIR --adapter TRAINED_DIR --out DIR

`init` writes a PEFT adapter directory that PEFT, TRL and Axolotl (`lora_model_dir`) start training
from, the statistics (`fisher_stats.safetensors`) and `report.json`. Under the `preserve` policy the
base weights change (`W − s·B·A`), so it also writes that residual base to `ADAPTER_DIR/residual_base`
and names it as the base to train on; under `zero` the original base is the one to train on.
`export` turns an adapter trained on a residual base (it has the record `fisher_init.safetensors` beside
it, or in `--record`) into one that loads with plain PEFT on the original base.

Exit codes: 0 done, 2 bad input (the reason on one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fisher_core.config import FisherConfig
from fisher_core.write.record import RECORD_FILE

if typing.TYPE_CHECKING:
    from fisher_core.api import InitReport

RESIDUAL_DIR = "residual_base"
STATS_FILE = "fisher_stats.safetensors"
REPORT_FILE = "report.json"
# FisherConfig fields without a flag: `progress` is `--quiet`; `force` never applies to a fresh adapter.
NO_FLAG = {"progress", "force"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
KEEP_STATS_FILE = "fisher_stats.keep.safetensors"  # `keep_knowledge`: fisher_core.keep.keep_cache_path(STATS_FILE)
# what `init` writes and `--overwrite` replaces; a README.md (PEFT's model card) is added only where there is none,
# and every other file in --out (the user's README, a report.png) is left as it is
OUTPUTS = (
    "adapter_config.json", "adapter_model.safetensors", STATS_FILE, REPORT_FILE, RECORD_FILE, RESIDUAL_DIR,
    KEEP_STATS_FILE,
)  # fmt: skip
MODEL_CARD = "README.md"


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 2 bad input)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except UsageError as e:
            print(f"fisher-lora {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
            return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fisher-lora", description="Initialize LoRA adapters from the Fisher information.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    init = sub.add_parser("init", help="initialize a LoRA adapter from a model dir and a JSONL file")
    init.set_defaults(run=run_init)
    io = init.add_argument_group("inputs and outputs")
    io.add_argument(
        "--model", required=True, type=Path, metavar="DIR", help="local model directory (weights and tokenizer)"
    )
    io.add_argument(
        "--data", required=True, type=Path, metavar="FILE", help="JSONL: text, prompt/completion or messages rows"
    )
    fmt = io.add_mutually_exclusive_group()
    fmt.add_argument(
        "--text-field", metavar="FIELD", help="plain-text rows: the field holding the text (all tokens supervised)"
    )
    fmt.add_argument("--chat", action="store_true", help="'messages' rows rendered with the chat template")
    io.add_argument("--out", required=True, type=Path, metavar="DIR", help="adapter directory to write")
    io.add_argument("--overwrite", action="store_true", help="replace what a previous init wrote in --out")
    io.add_argument("--config", type=Path, metavar="YAML", help="YAML file of FisherConfig fields (flags override it)")
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    lora = init.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=16, metavar="R", help="LoRA rank r (default 16)")
    lora.add_argument(
        "--targets", default="q_proj,v_proj", metavar="NAMES", help="comma-separated module names or all-linear"
    )
    lora.add_argument("--lora-alpha", type=float, metavar="ALPHA", help="LoRA alpha (default: the rank, so s = 1)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="LoRA dropout saved in the config")
    lora.add_argument("--use-rslora", action="store_true", help="scale s = alpha/sqrt(r)")
    data = init.add_argument_group("calibration data")
    data.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per calibration batch (default 8)")
    data.add_argument(
        "--max-length", type=int, default=512, metavar="N", help="tokens per row, longer rows are cut (512)"
    )
    data.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (default: the checkpoint's)")
    data.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    fisher = init.add_argument_group("Fisher (FisherConfig fields; see --config)")
    _add_config_flags(fisher)
    report = sub.add_parser("report", help="plot statistics and chosen ranks: report.png + report.json")
    report.set_defaults(run=run_report)
    report.add_argument("source", type=Path, help="adapter dir written by init, or a fisher_stats.safetensors")
    report.add_argument("--out", type=Path, help="directory for report.png/report.json (default: next to source)")
    report.add_argument("--top", type=int, default=4, help="layers whose spectra are drawn (default 4)")
    export = sub.add_parser("export", help="make an adapter trained on a residual base load on the original base")
    export.set_defaults(run=run_export)
    export.add_argument("--model", required=True, type=Path, metavar="DIR", help="the ORIGINAL model directory")
    export.add_argument("--adapter", required=True, type=Path, metavar="DIR", help="the trained adapter directory")
    export.add_argument(
        "--record", type=Path, metavar="DIR", help=f"directory holding {RECORD_FILE} (default: --adapter)"
    )
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the exported adapter")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    return parser


def _add_config_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per FisherConfig field (`--num-batches N`); a field that takes a bool is a switch pair
    (`--keep-knowledge` / `--no-keep-knowledge`; neither: the field's default)."""
    for name, field in FisherConfig.model_fields.items():
        if name in NO_FLAG:
            continue
        help_text = _help(name, field.description, field.default)
        if bool in (typing.get_args(field.annotation) or (field.annotation,)):
            group.add_argument(_flag(name), dest=f"cfg.{name}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)  # fmt: skip
        else:
            group.add_argument(_flag(name), dest=f"cfg.{name}", metavar=_metavar(field.annotation),
                               default=argparse.SUPPRESS, help=help_text)  # fmt: skip


def run_export(args: argparse.Namespace) -> int:
    """Original base + trained adapter, base offsets restored from the record, exported for the original base."""
    from fisher_core.write import export_adapter, load_record, restore_offsets

    record_dir = args.record or args.adapter
    for flag, path in (("--adapter", args.adapter / "adapter_config.json"), ("--model", args.model / "config.json")):
        if not path.is_file():
            raise UsageError(f"{flag} {path.parent}: no {path.name} there")
    record = load_record(record_dir)
    if record is None:
        raise UsageError(
            f"{record_dir / RECORD_FILE}: no such file; an adapter without a record did not change the base "
            "(policy zero) and already loads on the original base, or pass --record with the run's record"
        )
    if args.out.resolve() == args.adapter.resolve():
        raise UsageError(f"--out {args.out} is the trained adapter itself; choose another directory")
    if not args.overwrite and (args.out / "adapter_model.safetensors").exists():
        raise UsageError(f"--out {args.out} already holds an adapter; pass --overwrite or another --out")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    model = PeftModel.from_pretrained(base, args.adapter)
    try:
        restore_offsets(model, record)
    except KeyError as e:
        raise UsageError(
            f"--adapter {args.adapter}: its record names {e.args[0].split('layer ')[-1]}; the record and the adapter "
            "come from different runs (or target sets): pass the record saved with this adapter"
        ) from None
    export_adapter(model, args.out, overwrite=args.overwrite)
    print(f"fisher-lora: wrote {args.out}, an adapter for the original base {args.model} (plain PEFT loads it)")
    return 0


def run_init(args: argparse.Namespace) -> int:
    """Validate everything cheap first (flags, paths, data), then load, initialize and write. Everything is
    written into a temporary sibling of `--out` and moved into place only when complete: a failed or
    interrupted run leaves `--out` as it was."""
    config = fisher_config(args)
    _check_init_inputs(args, config)
    _configure_output(args.quiet)
    from fisher_core.data import DataError, FormatError, load_batches

    tokenizer = _load_tokenizer(args.model)
    try:
        batches = load_batches(
            args.data, tokenizer, batch_size=args.batch_size, num_batches=config.num_batches,
            text_field=args.text_field, chat=args.chat, max_length=args.max_length,
        )  # fmt: skip
    except DataError as e:
        raise UsageError(f"{e}; pass --text-field FIELD or --chat" if isinstance(e, FormatError) else str(e)) from e
    peft_model = _peft_model(args)
    with _new_dirs(args.out.parent):  # removed again if the run fails
        _initialize_into(args, config, peft_model, batches, tokenizer)
    return 0


def _initialize_into(
    args: argparse.Namespace, config: FisherConfig, peft_model: Any, batches: list[dict], tokenizer: Any
) -> None:
    """Initialize, write into a temporary sibling of `--out`, move into place and say where to train."""
    from fisher_core import initialize

    staging = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}.tmp-"))
    try:
        if Path(config.cache_path).resolve() == (args.out / STATS_FILE).resolve():  # a fresh run's own statistics
            config = config.model_copy(update={"cache_path": staging / STATS_FILE})
        try:
            report = initialize(peft_model, batches, config=config, tokenizer=tokenizer)
        except (ValueError, KeyError) as e:  # a rank, budget or cache that does not fit this model
            raise UsageError(str(e)) from e
        base_dir = _train_on(args, peft_model)
        _write_init_outputs(args, staging, base_dir, config, peft_model, tokenizer, report)
        _move_into_place(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say_where_to_train(args, config, base_dir)


@contextlib.contextmanager
def _new_dirs(path: Path) -> Iterator[None]:
    """Create `path` and its missing parents; if the block fails, remove the ones made here (nothing is left)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for p in missing:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def fisher_config(args: argparse.Namespace) -> FisherConfig:
    """FisherConfig from `--config` YAML, then flags; the statistics go to `--out` unless `--cache-path`."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if args.config is not None:
        values.update(_read_yaml(args.config))
        source.update({k: f"{args.config}: key {k!r}" for k in values})
    for key, value in vars(args).items():
        if key.startswith("cfg."):
            values[key[4:]] = value
            source[key[4:]] = _flag(key[4:])
    values["progress"] = not args.quiet
    if values.get("cache_path") in (None, ""):  # unset, `cache_path: null` in YAML, or an empty flag
        if values.get("cache_path") == "":
            raise UsageError(f"{source.get('cache_path', '--cache-path')}: empty; pass a file path or leave it unset")
        values["cache_path"] = args.out / STATS_FILE
    try:
        return FisherConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        name = err["loc"][0] if err["loc"] else None
        if name is not None:
            where = source.get(name, str(name))
        else:  # a rule across fields: name the flags (or YAML keys) it mentions
            where = ", ".join(v for k, v in source.items() if k in err["msg"]) or "FisherConfig"
        if err["type"] == "extra_forbidden":
            raise UsageError(f"{where}: unknown field; fields are {', '.join(FisherConfig.model_fields)}") from e
        got = f" (got {err['input']!r})" if name is not None else ""
        raise UsageError(f"{where}: {err['msg'].removeprefix('Value error, ')}{got}") from e


def run_report(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401 — the report's only optional dependency
    except ImportError:
        raise UsageError(
            "the report draws with matplotlib, which is not installed: pip install 'fisher-lora[report]'"
        ) from None
    from fisher_core.report import ReportError, write_report

    if args.top < 1:
        raise UsageError(f"--top must be at least 1 (got {args.top})")
    try:
        png, js = write_report(args.source, args.out, top=args.top)
    except ReportError as e:
        raise UsageError(str(e)) from e
    print(f"fisher-lora: wrote {png} and {js}")
    return 0


def _check_init_inputs(args: argparse.Namespace, config: FisherConfig) -> None:
    if not (args.model / "config.json").is_file():
        raise UsageError(f"--model {args.model}: no config.json there; pass a local model directory")
    if not args.data.is_file():
        raise UsageError(f"--data {args.data}: no such file")
    for flag, value in (("--rank", args.rank), ("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1 (got {value})")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})")
    if config.policy == "preserve" and args.lora_dropout > 0:  # write/plan.py refuses it too, after the load
        raise UsageError(
            f"--policy preserve with --lora-dropout {args.lora_dropout}: in training the adapter reads dropout(x) "
            "while the base lost s·B·A·x, so the step-0 loss would not be the original model's; pass "
            "--lora-dropout 0 or use the default policy zero"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; pass a directory")
    if args.out.resolve() == args.model.resolve() or args.model.resolve() in args.out.resolve().parents:
        raise UsageError(
            f"--out {args.out} is inside --model {args.model}: the adapter would change what loads from the model "
            "directory; pass an --out outside it"
        )
    if Path(config.cache_path).is_dir():
        raise UsageError(f"cache_path {config.cache_path} is a directory; pass a file path")
    _check_device(args.device)
    # --out's parent holds the staging folder; --out and the cache's folder receive files
    for flag, path in (("--out", args.out), ("--out", args.out.parent), ("cache_path", Path(config.cache_path).parent)):
        _check_can_write(flag, path)
    if not args.overwrite and any((args.out / f).exists() for f in OUTPUTS):
        raise UsageError(f"--out {args.out} already holds fisher-lora output; pass --overwrite or another --out")


def _check_can_write(flag: str, path: Path) -> None:
    """Whether files can be made in `path` (or, where it does not exist yet, in its nearest existing parent):
    probed by creating and removing a temporary folder there, which also holds for root, whom permission bits
    do not stop, and for read-only file systems. Creates nothing that stays."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: cannot create this directory ({existing} is a file); choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".fisher-lora-probe-"))
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({e.strerror}); choose another path") from None


def _check_device(device: str | None) -> None:
    """`--device` names a device this machine has: cpu, or an available accelerator (cuda, cuda:N, xpu, mps)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device name; pass cpu, cuda or cuda:N") from None
    if kind.type == "cpu":
        return
    backend = getattr(torch, kind.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {device}: this machine has no {kind.type} device; pass cpu or leave it unset")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if kind.index is not None and kind.index >= count:
        raise UsageError(f"--device {device}: this machine has {count} {kind.type} device(s), numbered from 0")


def _configure_output(quiet: bool) -> None:
    """Log lines (with numbers) to stderr; `quiet` turns the progress bars off."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("fisher_core").setLevel(logging.INFO)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model_dir}: cannot load a tokenizer ({e})") from e


def _peft_model(args: argparse.Namespace) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).to(device)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {args.model}: cannot load a causal LM ({e})") from e
    targets = "all-linear" if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t]
    lora = LoraConfig(
        r=args.rank, lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.rank,
        lora_dropout=args.lora_dropout, target_modules=targets, use_rslora=args.use_rslora, task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise UsageError(f"--targets {args.targets}: {e}") from e


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace fisher-lora's outputs in `out` with the complete set in `staging` (other files in `out` stay, a
    README.md among them: the staged model card goes in only where there is none).
    The old outputs are set aside first and deleted only once every new one is in place; SIGINT waits."""
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        out.mkdir(exist_ok=True)
        for name in OUTPUTS:
            if (out / name).exists():
                os.replace(out / name, old / name)
        for item in staging.iterdir():
            if item.name != MODEL_CARD or not (out / MODEL_CARD).exists():
                os.replace(item, out / item.name)
    except BaseException:
        for item in old.iterdir():  # put the previous outputs back
            os.replace(item, out / item.name)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        shutil.rmtree(old, ignore_errors=True)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _write_init_outputs(
    args: argparse.Namespace,
    staging: Path,
    base_dir: Path,
    config: FisherConfig,
    peft_model: Any,
    tokenizer: Any,
    report: InitReport,
) -> None:
    """Into `staging`: the adapter (its config naming the base to train on, as it will be under `--out`), the
    residual base if the base changed, the init record, the statistics and `report.json`."""
    from fisher_core.io import atomic_write_text
    from fisher_core.write import get_record, save_record

    record = get_record(peft_model, "default")
    residual = record is not None and record.changes_base
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(staging, save_embedding_layers=False)
    if residual:
        save_record(record, staging)
        base = peft_model.unload()
        base.save_pretrained(staging / RESIDUAL_DIR)
        tokenizer.save_pretrained(staging / RESIDUAL_DIR)
    stats_path = staging / STATS_FILE
    if Path(config.cache_path).resolve() != stats_path.resolve():
        shutil.copyfile(config.cache_path, stats_path)
    info = {
        "model": str(args.model.resolve()),
        "data": str(args.data.resolve()),
        "train_on_base": str(base_dir),
        "residual_base": residual,
        "lora": {"r": args.rank, "lora_alpha": peft_model.peft_config["default"].lora_alpha, "targets": args.targets},
        "config": json.loads(config.model_dump_json(exclude={"progress", "cache_path"})),
    }
    atomic_write_text(staging / REPORT_FILE, json.dumps({**report.to_json(), "init": info}, indent=2))


def _train_on(args: argparse.Namespace, peft_model: Any) -> Path:
    """The base to train the adapter on: the residual base under `--out` if the base changed, else `--model`."""
    from fisher_core.write import get_record

    record = get_record(peft_model, "default")
    return (args.out / RESIDUAL_DIR if record is not None and record.changes_base else args.model).resolve()


def _say_where_to_train(args: argparse.Namespace, config: FisherConfig, base_dir: Path) -> None:
    out = args.out
    files = f"adapter_config.json, adapter_model.safetensors, {STATS_FILE}, {REPORT_FILE}"
    print(f"fisher-lora: wrote adapter {out} ({files})")
    if base_dir != args.model.resolve():
        print(
            f"fisher-lora: policy 'preserve' moved s·B·A out of the base weights: train on the residual base "
            f"{base_dir}, not on {args.model} (the adapter alone on the original base would be wrong)"
        )
    else:
        print(f"fisher-lora: policy '{config.policy}' left the base untouched: train on the original base {base_dir}")
    print(f"fisher-lora: Axolotl: base_model: {base_dir} / lora_model_dir: {out.resolve()}")
    print(f"fisher-lora: plots: fisher-lora report {out}")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({e})") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of FisherConfig fields, got {type(values).__name__}")
    return values


def _help(name: str, description: str, default: Any) -> str:
    if name == "cache_path":
        return f"{description} (default --out/{STATS_FILE}, recomputed; a reused file is not checked against --data)"
    return f"{description} (default {default})".replace("%", "%%")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(typing.get_args(annotation)) + "}"
    kinds = set(typing.get_args(annotation)) or {annotation}
    return "N" if int in kinds else "X" if float in kinds else "PATH" if Path in kinds else "VALUE"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fisher-lora: warning: {_one_line(str(message))}", file=sys.stderr)
