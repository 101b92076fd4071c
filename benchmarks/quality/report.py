"""The protocol's tables and plot, written from its records (`protocol.jsonl`).

Quality is read at the run's best validation checkpoint ("stopped": validation-based stopping) and at its
last step ("final"); `±` is the standard deviation over seeds. Written next to the records as `tables.md`
and `curves.png`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.quality.protocol import CHAT_TASKS, Preset, chosen_lr, competing, load, stopped

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _runs(records: list[dict], task: str, method: str, lr: float | None) -> list[dict]:
    return [r for r in records if (r["task"], r["method"], r["lr"]) == (task, method, lr) and "curve" in r]


# the protocol's method names, as the tables show them: `fisher` ran with policy `preserve` (the default until
# the encoder protocol chose `zero`)
LABELS = {"fisher": "fisher-preserve"}


def library_default(preset: Preset) -> str:
    """The method that is what the library's default does on the preset's model: keep mode on a chat model
    (`keep_knowledge="auto"`), the task-whitened init elsewhere."""
    return "fisher-keep" if set(preset.tasks) <= set(CHAT_TASKS) else "fisher-zero"


def label(method: str, preset: Preset) -> str:
    """`method`'s name in the tables, marked `(default)` where it is `library_default`."""
    return f"{method} (default)" if method == library_default(preset) else LABELS.get(method, method)


def _mean(values: list[float]) -> float:
    return statistics.mean(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{_mean(values):.{digits}f} ± {_std(values):.{digits}f}"


def _at(record: dict, fraction: float, key: str) -> float:
    target = fraction * record["steps"]
    return min(record["curve"], key=lambda p: abs(p["step"] - target))[key]


def _reach(record: dict, target: float) -> int | None:
    """First evaluated step whose test loss is at most `target`."""
    return next((p["step"] for p in record["curve"] if p["test_loss"] <= target), None)


def lr_cell(preset: Preset, records: list[dict], task: str, method: str, lr: float) -> str:
    """`lr`, marked `(edge)` when no competing lr (`protocol.competing`) lies on one side of it: the best is not
    bracketed (the grid ran out of extensions, or their seeds have not all run yet)."""
    ran = {r["lr"] for r in competing(preset, records, task, method)}
    return f"{lr:g}" + (" (edge)" if len(ran) > 1 and lr in (min(ran), max(ran)) else "")


def own_lr_table(records: list[dict], task: str, preset: Preset) -> str:
    """Every method at its own best lr (`protocol.chosen_lr`)."""
    head = [
        "method",
        "best lr",
        "seeds",
        "test loss (stopped)",
        "accuracy (stopped)",
        "stop step",
        "test loss (final)",
        "accuracy (final)",
        *(f"loss@{int(f * 100)}%" for f in FRACTIONS),
        "steps to LoRA's stopped loss",
        "init s",
    ]
    lora = _runs(records, task, "lora", chosen_lr(preset, records, task, "lora"))
    target = _mean([stopped(r)["test_loss"] for r in lora]) if lora else None
    rows = []
    for method in preset.methods:
        lr = chosen_lr(preset, records, task, method)
        runs = _runs(records, task, method, lr)
        if not runs:
            continue
        reach = [_reach(r, target) for r in runs] if target is not None else []
        rows.append(
            (
                _mean([stopped(r)["test_loss"] for r in runs]),
                [
                    label(method, preset),
                    lr_cell(preset, records, task, method, lr),
                    str(len(runs)),
                    _cell([stopped(r)["test_loss"] for r in runs]),
                    _cell([stopped(r)["accuracy"] for r in runs]),
                    "/".join(str(stopped(r)["step"]) for r in runs),
                    _cell([r["curve"][-1]["test_loss"] for r in runs]),
                    _cell([r["curve"][-1]["accuracy"] for r in runs]),
                    *(_cell([_at(r, f, "test_loss") for r in runs]) for f in FRACTIONS),
                    "/".join("never" if s is None else str(s) for s in reach) or "–",
                    f"{_mean([r['init_seconds'] for r in runs]):.1f}",
                ],
            )
        )
    return _markdown(head, [row for _, row in sorted(rows, key=lambda t: t[0])])


def summary_table(records: list[dict], preset: Preset, key: str = "stopped") -> str:
    """Methods × tasks: test loss at each method's own best lr, at the validation-chosen step (`stopped`) or
    at the last step (`final`); the best mean per task among cells of ≥ 2 seeds in bold (one seed names no winner)."""
    cells: dict[tuple[str, str], list[float]] = {}
    for task in preset.tasks:
        for method in preset.methods:
            runs = _runs(records, task, method, chosen_lr(preset, records, task, method))
            if runs:
                pick = stopped if key == "stopped" else (lambda r: r["curve"][-1])
                cells[task, method] = [pick(r)["test_loss"] for r in runs]
    rows = []
    for method in preset.methods:
        row = [label(method, preset)]
        for task in preset.tasks:
            values = cells.get((task, method))
            best = min((_mean(v) for (t, _), v in cells.items() if t == task and len(v) > 1), default=None)
            text = _cell(values) if values else "–"
            row.append(f"**{text}**" if values and len(values) > 1 and _mean(values) == best else text)
        rows.append(row)
    return _markdown(["method", *preset.tasks], rows)


def robustness_table(records: list[dict], task: str, preset: Preset) -> str:
    """Every method at 0.5×, 1× and 2× default LoRA's best lr: stopped test loss, and whether it is worse
    than default LoRA at that lr by more than 2× the larger seed std."""
    lora_lr = chosen_lr(preset, records, task, "lora")
    if lora_lr is None:
        return ""
    lrs = (lora_lr / 2, lora_lr, lora_lr * 2)
    head = ["method", *(f"lr {lr:g} ({m}× LoRA's)" for lr, m in zip(lrs, ("0.5", "1", "2"), strict=True))]
    rows = []
    for method in preset.methods:
        cells = [label(method, preset)]
        for lr in lrs:
            mine = [stopped(r)["test_loss"] for r in _runs(records, task, method, lr)]
            base = [stopped(r)["test_loss"] for r in _runs(records, task, "lora", lr)]
            mark = ""
            if method != "lora" and len(mine) > 1 and len(base) > 1:
                gap, noise = _mean(mine) - _mean(base), 2 * max(_std(mine), _std(base))
                mark = " **worse**" if gap > noise else (" better" if -gap > noise else "")
            cells.append(_cell(mine) + mark)
        rows.append(cells)
    return _markdown(head, rows)


def ablation_table(records: list[dict], task: str, preset: Preset) -> str:
    """`fisher` (policy preserve), its variants, the default `fisher-zero` and LoRA, all at `fisher`'s lr."""
    lr = chosen_lr(preset, records, task, "fisher")
    head = ["variant", "seeds", "test loss (stopped)", "test loss (final)", "loss@25%", "accuracy (final)"]
    rows = []
    for method in ("fisher", "fisher-zero", *preset.ablations, "lora"):
        runs = _runs(records, task, method, lr)
        if runs:
            rows.append([
                label(method, preset), str(len(runs)), _cell([stopped(r)["test_loss"] for r in runs]),
                _cell([r["curve"][-1]["test_loss"] for r in runs]), _cell([_at(r, 0.25, "test_loss") for r in runs]),
                _cell([r["curve"][-1]["accuracy"] for r in runs]),
            ])  # fmt: skip
    return _markdown(head, rows) if rows else ""


def verdict(records: list[dict], task: str, preset: Preset, ours: str = "fisher") -> str:
    """One line: `ours` against the best other init, each at its own best lr (stopped test loss)."""
    scores = {}
    for method in preset.methods:
        runs = _runs(records, task, method, chosen_lr(preset, records, task, method))
        if len(runs) > 1:
            scores[method] = [stopped(r)["test_loss"] for r in runs]
    if ours not in scores or len(scores) < 2:
        return f"{task}: not enough seeds yet"
    rival = min((m for m in scores if not m.startswith("fisher")), key=lambda m: _mean(scores[m]), default=None)
    if rival is None:
        return f"{task}: no other init has several seeds yet"
    gap = _mean(scores[rival]) - _mean(scores[ours])
    noise = 2 * max(_std(scores[ours]), _std(scores[rival]))
    word = "wins" if gap > noise else ("loses" if -gap > noise else "ties (within 2× seed std)")
    return (
        f"{task}: `{label(ours, preset)}` {word} against `{label(rival, preset)}`: stopped test loss "
        f"{_mean(scores[ours]):.3f} vs "
        f"{_mean(scores[rival]):.3f} (gap {gap:+.3f}, 2× std {noise:.3f})"
    )


PROBES = {"own_loss": "own answers", "general_loss": "general text"}


def _forgetting_runs(records: list[dict], task: str, method: str, preset: Preset) -> list[dict]:
    runs = _runs(records, task, method, chosen_lr(preset, records, task, method))
    return [r for r in runs if "own_loss" in r["curve"][0]]


def forgetting_table(records: list[dict], task: str, preset: Preset, untuned: dict[str, float]) -> str:
    """Each method at every lr it ran (its own lr in bold), at the validation-chosen step: test loss and forgetting
    — the increase over the untuned model of the loss on its own greedy answers and on general text (mean ± std
    over seeds) — and the forgetting at the last step."""
    head = ["method", "lr", "seeds", "test loss (stopped)", *(f"{name} Δ (stopped)" for name in PROBES.values()),
            *(f"{name} Δ (final)" for name in PROBES.values())]  # fmt: skip
    rows = []
    for method in preset.methods:
        own = chosen_lr(preset, records, task, method)
        for lr, runs in sorted(_runs_with_probes(records, task, method).items()):
            rows.append([
                label(method, preset), f"**{lr:g}**" if lr == own else f"{lr:g}", str(len(runs)),
                _cell([stopped(r)["test_loss"] for r in runs]),
                *(_cell([stopped(r)[k] - untuned[k] for r in runs]) for k in PROBES),
                *(_cell([r["curve"][-1][k] - untuned[k] for r in runs]) for k in PROBES),
            ])  # fmt: skip
    return _markdown(head, rows) if rows else ""


def _values(runs: list[dict], key: str) -> list[float]:
    """`key` at each run's validation-chosen step."""
    return [stopped(r)[key] for r in runs]


def _near_lora(records: list[dict], task: str, preset: Preset) -> dict[tuple[str, float], list[dict]]:
    """Every (method, lr) with ≥ 2 seeds whose mean stopped test loss is within 2× the larger seed std of LoRA's
    at LoRA's own lr: the points that learn the task as well as LoRA does, as far as the seeds can tell."""
    lora = _forgetting_runs(records, task, "lora", preset)
    if len(lora) < 2:
        return {}
    out = {}
    for method in preset.methods:
        for lr, runs in sorted(_runs_with_probes(records, task, method).items()):
            if len(runs) > 1 and (gap := _gap(runs, lora, "test_loss"))[0] <= gap[1]:
                out[(method, lr)] = runs
    return out


def keep_verdict(records: list[dict], task: str, preset: Preset, untuned: dict, ours: str = "fisher-keep") -> str:
    """Issue 27's target on `task`: among the points that learn the task as well as LoRA (`_near_lora`), does
    `ours`'s least-forgetting point forget less than every other init's, on each probe, by more than 2× the larger
    seed std? Then which (method, lr) points Pareto-dominate `ours` at its own lr (as low a test loss and no more
    forgetting on either probe). Inits with no point near LoRA's test loss are named."""
    near = _near_lora(records, task, preset)
    mine = _forgetting_runs(records, task, ours, preset)
    if not near or len(mine) < 2:
        return f"{task}: not enough seeds yet"
    near_methods = {method for method, _ in near}
    if ours not in near_methods:
        return f"{task}: no `{label(ours, preset)}` point within noise of LoRA's test loss"
    parts = []
    for key, name in PROBES.items():
        best = {}  # each method's least-forgetting point near LoRA's test loss
        for (method, lr), runs in near.items():
            if method not in best or _mean(_values(runs, key)) < _mean(_values(best[method][1], key)):
                best[method] = (lr, runs)
        lr, runs = best.pop(ours)
        margins = {m: (*_gap(r, runs, key), at, _mean(_values(r, key)) - untuned[key]) for m, (at, r) in best.items()}
        closest = min(margins, key=lambda m: margins[m][0] - margins[m][1])
        gap, noise, at, theirs = margins[closest]
        word = "less than every other init beyond noise" if gap > noise else "not beyond noise below every init"
        ours_delta = _mean(_values(runs, key)) - untuned[key]
        closest_at = f"{label(closest, preset)} @ {at:g}: {theirs:+.3f}"
        parts.append(f"{name} Δ {ours_delta:+.3f} @ {lr:g}: {word} "
                     f"(closest {closest_at}, gap {gap:+.3f}, 2× std {noise:.3f})")  # fmt: skip
    far = [label(m, preset) for m in preset.methods
           if _forgetting_runs(records, task, m, preset) and m not in near_methods]  # fmt: skip
    dominated = [f"{label(m, preset)} @ {lr:g}" for m in preset.methods if m != ours
                 for lr, runs in sorted(_runs_with_probes(records, task, m).items())
                 if len(runs) > 1 and _dominates(runs, mine)]  # fmt: skip
    parts.append(f"no point near LoRA's test loss: {', '.join(far)}" if far else "every init has a point near it")
    parts.append(f"own lr dominated by {', '.join(dominated)}" if dominated else "no (method, lr) dominates its own lr")
    return f"{task}: `{label(ours, preset)}` near LoRA's test loss — " + "; ".join(parts)


def _gap(theirs: list[dict], ours: list[dict], key: str) -> tuple[float, float]:
    """(their mean − our mean, 2× the larger seed std) of `key`."""
    a, b = _values(theirs, key), _values(ours, key)
    return _mean(a) - _mean(b), 2 * max(_std(a), _std(b))


def _dominates(runs: list[dict], ours: list[dict]) -> bool:
    """The mean of `runs` is at most `ours`'s in test loss and in the increase on every forgetting probe."""
    return all(_mean(_values(runs, k)) <= _mean(_values(ours, k)) for k in ("test_loss", *PROBES))


def forgetting_plot(records: list[dict], preset: Preset, untuned: dict[str, float], out: Path) -> None:
    """Task loss against forgetting at the validation-chosen step (mean ± std over seeds), one point per lr a method
    ran, joined in lr order, the method's chosen lr ringed: one row per task that has runs, one column per
    forgetting probe. Down and left is better; a method whose line lies below another's at the same forgetting
    learns more for what it forgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in preset.tasks if any(_runs_with_probes(records, t, m) for m in preset.methods)]
    fig, axes = plt.subplots(len(tasks), len(PROBES), figsize=(9, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        for ax, (key, name) in zip(row, PROBES.items(), strict=True):
            for method in preset.methods:
                by_lr = _runs_with_probes(records, task, method)
                if not by_lr:
                    continue
                points = {lr: ([stopped(r)[key] - untuned[key] for r in runs], [stopped(r)["test_loss"] for r in runs])
                          for lr, runs in sorted(by_lr.items())}  # fmt: skip
                line = ax.plot([_mean(x) for x, _ in points.values()], [_mean(y) for _, y in points.values()],
                               marker="o", ms=3, label=label(method, preset), **_style(preset, method))[0]  # fmt: skip
                for lr, (x, y) in points.items():
                    if len(x) > 1:
                        ax.errorbar(_mean(x), _mean(y), xerr=_std(x), yerr=_std(y), color=line.get_color(), lw=0.7)
                    ax.annotate(f"{lr:g}", (_mean(x), _mean(y)), fontsize=5, xytext=(2, 2), textcoords="offset points")
                if (chosen := chosen_lr(preset, records, task, method)) in points:
                    x, y = points[chosen]
                    ax.plot(_mean(x), _mean(y), "o", ms=9, mfc="none", color=line.get_color())
            ax.set_title(task, fontsize=9)
            ax.set_xlabel(f"forgetting: loss increase on {name}")
            ax.set_ylabel("test loss (stopped)")
        row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _style(preset: Preset, method: str) -> dict:
    """One line style per method of the preset, the same in every panel and picture: tab20's ten strong shades
    first, then its light ones dashed (a light shade is its strong neighbour's hue)."""
    from matplotlib import colormaps

    i = preset.methods.index(method) % 20
    return {"color": colormaps["tab20"](2 * i % 20 + 2 * i // 20), "linestyle": "-" if i < 10 else "--"}


def _runs_with_probes(records: list[dict], task: str, method: str) -> dict[float, list[dict]]:
    """A method's runs on `task` that carry forgetting probes, by lr."""
    by_lr: dict[float, list[dict]] = {}
    for r in records:
        if (r["task"], r["method"]) == (task, method) and "curve" in r and "own_loss" in r["curve"][0]:
            by_lr.setdefault(r["lr"], []).append(r)
    return by_lr


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot(records: list[dict], preset: Preset, out: Path) -> None:
    """Test loss against steps, each method at its own best lr (mean over seeds), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(preset.tasks), figsize=(4.2 * len(preset.tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], preset.tasks, strict=True):
        for method in preset.methods:
            lr = chosen_lr(preset, records, task, method)
            runs = _runs(records, task, method, lr)
            if runs:
                steps = [p["step"] for p in runs[0]["curve"]]
                loss = [_mean([r["curve"][i]["test_loss"] for r in runs]) for i in range(len(steps))]
                name = f"{label(method, preset)} @ {lr:g}"
                ax.plot(steps, loss, marker="o", ms=3, label=name, **_style(preset, method))
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("test loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write(path: Path, preset: Preset) -> None:
    """`tables.md` and `curves.png` beside the records in `path`."""
    records = load(path)
    default = library_default(preset)
    ours = default if default in preset.methods else "fisher"  # the library default, where it ran
    failed = sorted({f"{r['task']}/{r['method']}: {r['failed']}" for r in records if "failed" in r})
    untuned_path = path.parent / "untuned.json"
    untuned = json.loads(untuned_path.read_text()) if untuned_path.is_file() else None
    parts = [f"# Quality protocol ({path.parent.name}): {sum('curve' in r for r in records)} runs", ""]
    parts += [
        "## Test loss at each method's own best lr (validation-chosen step; mean ± std over seeds)",
        "",
        summary_table(records, preset),
        "",
        "The same at the last step:",
        "",
        summary_table(records, preset, key="final"),
        "",
        "## Verdicts (each at its own best lr)",
        "",
        *(f"- {verdict(records, t, preset, ours)}" for t in preset.tasks),
        "",
    ]
    if untuned and "fisher-keep" in preset.methods:
        parts += ["## Learn the task, keep what the model knew (`fisher-keep` among the points as good as LoRA)", "",
                  *(f"- {keep_verdict(records, t, preset, untuned)}" for t in preset.tasks), ""]  # fmt: skip
    for task in preset.tasks:
        parts += [
            f"## {task}",
            "",
            "Each method at its own best lr:",
            "",
            own_lr_table(records, task, preset),
            "",
            "At default LoRA's best lr and half and twice it (stopped test loss):",
            "",
            robustness_table(records, task, preset),
            "",
        ]
        if untuned and task in untuned.get("tasks", {}):
            val, test = untuned["tasks"][task]
            parts += [f"The untuned model: validation loss {val:.3f}, test loss {test:.3f}.", ""]
        if untuned and (table := forgetting_table(records, task, preset, untuned)):
            parts += ["Forgetting: increase over the untuned model, each method at every lr it ran (own lr bold):", "",
                      table, ""]  # fmt: skip
        ablation = ablation_table(records, task, preset)
        if ablation:
            lr = chosen_lr(preset, records, task, "fisher")
            parts += [f"Ablation, every variant at fisher-preserve's own best lr ({lr:g}):", "", ablation, ""]
    if failed:
        parts += ["## Runs that failed", "", *(f"- {f}" for f in failed), ""]
    (path.parent / "tables.md").write_text("\n".join(parts))
    if records:
        plot(records, preset, path.parent / "curves.png")
    if untuned and any("own_loss" in r["curve"][0] for r in records if "curve" in r):
        forgetting_plot(records, preset, untuned, path.parent / "forgetting.png")
