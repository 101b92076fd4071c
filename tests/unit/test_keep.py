"""Keep mode (`keep_knowledge`, docs/design.md §7) against independent oracles: scipy's generalized
eigenproblem, a numerical optimum of the EWC objective, the default selector on the same data, the model's
own outputs, and a plain greedy-decoding loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from tiny import tiny_llama, train_tokenizer

from fisher_core import FisherConfig, FisherStats, LayerStats, initialize, select
from fisher_core.estimate.cache import CacheMismatchError
from fisher_core.keep import keep_data, keep_relative
from fisher_core.keep.answers import instructions
from fisher_core.select.base import Solver
from fisher_core.select.natural import select_natural

SQUARE = "model.layers.0.self_attn.q_proj"  # 32×32: swapping the input and output sides still runs
WIDE = "model.layers.0.mlp.down_proj"
DAMPING = 0.1  # large, so that forgetting it changes the answer


def _spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rank or 3 * d, generator=g, dtype=torch.float64)
    return (x @ x.T / x.shape[1]).float()


def _pair(shapes: dict[str, tuple[int, int]], seed: int = 0) -> tuple[FisherStats, FisherStats]:
    """Task statistics (full-rank factors, a mean gradient) and keep statistics (rank-deficient factors)."""
    task, keep = {}, {}
    for i, (name, (m, n)) in enumerate(shapes.items()):
        s = seed + 10 * i
        mean_grad = torch.randn(m, n, generator=torch.Generator().manual_seed(s), dtype=torch.float64).float()
        task[name] = LayerStats(_spd(n, s + 1), _spd(m, s + 2), num_tokens=10, mean_grad=mean_grad)
        keep[name] = LayerStats(_spd(n, s + 3, rank=n // 2), _spd(m, s + 4, rank=m // 2), num_tokens=7)
    return FisherStats(task, "empirical", 1), FisherStats(keep, "empirical", 1)


def _damped(s: torch.Tensor) -> np.ndarray:
    s = s.double().numpy()
    return s + DAMPING * np.trace(s) / s.shape[0] * np.eye(s.shape[0])


def _top_generalized(a: np.ndarray, b: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-r eigenpairs of `a v = λ b v` (scipy), directions as unit columns."""
    vals, vecs = scipy.linalg.eigh(a, b)
    vals, vecs = vals[::-1][:r], vecs[:, ::-1][:, :r]
    return vals, vecs / np.linalg.norm(vecs, axis=0)


def _cosines(rows: torch.Tensor, columns: np.ndarray) -> np.ndarray:
    rows = rows.double().numpy()
    return np.abs(np.sum(rows * columns.T, axis=1)) / np.linalg.norm(rows, axis=1)


@pytest.mark.parametrize("name", [SQUARE, WIDE])
def test_keep_directions_are_generalized_eigenvectors_against_the_damped_keep_factors(name):
    """A's rows: top generalized eigenvectors of (Ḡᵀ(S_G^K)⁻¹Ḡ, S_A^K); B's columns: of (Ḡ(S_A^K)⁻¹Ḡᵀ, S_G^K);
    eigenvalues σ². Fails if the damping is dropped, the task's factors are used, or the sides are swapped."""
    model, r = tiny_llama(), 4
    task, keep = _pair({name: tuple(model.get_submodule(name).weight.shape)})
    config = FisherConfig(progress=False, damping=DAMPING, policy="preserve", keep_knowledge=True)
    got = select(keep_relative(task, keep), model, rank=r, config=config)[name]
    gbar, s_a, s_g = task[name].mean_grad.double().numpy(), _damped(keep[name].input_cov), _damped(keep[name].grad_cov)
    vals_a, dirs_a = _top_generalized(gbar.T @ np.linalg.solve(s_g, gbar), s_a, r)
    vals_b, dirs_b = _top_generalized(gbar @ np.linalg.solve(s_a, gbar.T), s_g, r)
    np.testing.assert_allclose(got.scores[:r].double().numpy(), vals_a, rtol=1e-4)
    np.testing.assert_allclose(vals_b, vals_a, rtol=1e-8)
    np.testing.assert_allclose(_cosines(got.A, dirs_a), 1.0, atol=1e-5)
    np.testing.assert_allclose(_cosines(got.B.T, dirs_b), 1.0, atol=1e-5)
    zero = select(keep_relative(task, keep), model, rank=r, config=config.model_copy(update={"policy": "zero"}))[name]
    assert torch.all(zero.B == 0)
    np.testing.assert_allclose(_cosines(zero.A, dirs_a), 1.0, atol=1e-5)
    np.testing.assert_allclose(zero.A.norm(dim=1).numpy(), 1 / np.sqrt(3), rtol=1e-5)  # PEFT's default row norm


def test_keep_step_is_the_rank_r_optimum_of_the_ewc_objective():
    """Numerically minimizing ⟨Ḡ, PQᵀ⟩ + ½ tr(S_G^K PQᵀ S_A^K QPᵀ) over rank-r PQᵀ (L-BFGS, restarts) reaches
    −½ Σ_{i≤r} σ_i² with the selector's scores, at a step whose row and column spaces are A's and B's."""
    m, n, r = 6, 5, 2
    task, keep = _pair({"w": (m, n)}, seed=3)
    config = FisherConfig(progress=False, damping=DAMPING, policy="preserve", keep_knowledge=True)
    got = select_natural(torch.empty(m, n), keep_relative(task, keep)["w"], r, 1.0, config, Solver(sketch=None))
    gbar = task["w"].mean_grad.double()
    s_a, s_g = torch.from_numpy(_damped(keep["w"].input_cov)), torch.from_numpy(_damped(keep["w"].grad_cov))

    def objective(step: torch.Tensor) -> torch.Tensor:
        return (gbar * step).sum() + 0.5 * torch.trace(s_g @ step @ s_a @ step.T)

    best = min((_minimize(objective, m, n, r, seed) for seed in range(4)), key=objective)
    assert float(objective(best)) == pytest.approx(-0.5 * float(got.scores[:r].sum()), rel=1e-6)
    u, _, vh = torch.linalg.svd(best)
    np.testing.assert_allclose(_inside(got.A[:r], vh[:r]), 1.0, atol=1e-5)
    np.testing.assert_allclose(_inside(got.B[:, :r].T, u[:, :r].T), 1.0, atol=1e-5)


def _minimize(objective, m: int, n: int, r: int, seed: int) -> torch.Tensor:
    """A local minimum of `objective(P Qᵀ)` over P (m×r), Q (n×r) by L-BFGS from a random start, float64."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(m, r, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(n, r, generator=g, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p, q], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(p @ q.T)
        loss.backward()
        return loss

    opt.step(closure)
    return (p @ q.T).detach()


def _inside(rows: torch.Tensor, basis: torch.Tensor) -> np.ndarray:
    """‖projection of each row on the span of `basis`'s orthonormal rows‖ / ‖row‖: 1 iff the row lies in it."""
    rows, basis = rows.double(), basis.double()
    return ((rows @ basis.T @ basis).norm(dim=1) / rows.norm(dim=1)).numpy()


def _peft(seed: int = 0):
    tokenizer = train_tokenizer()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    return get_peft_model(tiny_llama(seed, vocab_size=len(tokenizer)), lora), tokenizer


def _task_batches(vocab: int = 384) -> list[dict]:
    ids = torch.randint(3, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _cfg(**kw) -> FisherConfig:
    return FisherConfig(**{"progress": False, "num_batches": 1, **kw})


@pytest.mark.parametrize("policy", ["zero", "preserve"])
def test_keep_data_equal_to_the_task_data_gives_the_default_natural_init(policy):
    """Known case: keep = task data whitens Ḡ by its own factors, which is `natural` (§2)."""
    default, _ = _peft()
    initialize(default, _task_batches(), config=_cfg(policy=policy))
    keep, _ = _peft()
    initialize(keep, _task_batches(), config=_cfg(policy=policy, keep_knowledge=True, keep_data=_task_batches()))
    want, got = _lora(default), _lora(keep)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["zero", "preserve"])
def test_keep_mode_leaves_the_function_unchanged_at_step_0(policy):
    model, tokenizer = _peft()
    ids = torch.randint(3, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peft_init = _lora(model)
    initialize(model, _task_batches(), config=_cfg(policy=policy, keep_knowledge=True), tokenizer=tokenizer)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert all(not torch.equal(v, peft_init[n]) for n, v in _lora(model).items() if "lora_A" in n)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 if policy == "preserve" else 0)


def _keep_batches() -> list[dict]:
    """Keep data unlike the task's: a narrow band of token ids, so its factors differ from the task's."""
    ids = torch.randint(3, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def _span(columns: np.ndarray) -> torch.Tensor:
    """Orthonormal rows spanning `columns`."""
    return torch.from_numpy(np.linalg.qr(columns)[0].T.copy())


def test_initialize_selects_on_separate_keep_datas_factors_and_scales_a_on_the_task_inputs():
    """`initialize` with keep batches unlike the task's: each A spans the top-r generalized eigenvectors of
    (Ḡᵀ(S_G^K)⁻¹Ḡ, S_A^K) (scipy) with Ḡ the task's and the factors a plain `estimate` of the keep batches —
    not the task factors' span (a `select` handed the task's statistics fails) — and under
    `zero_scale='activation'` E‖A x‖² over the *task's* inputs (plain forward hooks) is PEFT's default
    r·E‖x‖²/(3n) (scaled on the keep inputs it is off by their energy ratio)."""
    from fisher_core import estimate
    from fisher_core.keep.stats import factors_only
    from fisher_core.layers import canonical_name

    model, _ = _peft()
    layers = {canonical_name(n): m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, a[0].detach().flatten(0, 1)))
             for n, m in layers.items()]  # fmt: skip
    with torch.no_grad():
        model(**_task_batches()[0])
    for h in hooks:
        h.remove()
    config = _cfg(keep_knowledge=True, keep_data=_keep_batches(), damping=DAMPING, zero_scale="activation",
                  stop_tol=None)  # fmt: skip
    with model.disable_adapter():
        keep = estimate(model, _keep_batches(), target_modules=layers, config=factors_only(config))
    report = initialize(model, _task_batches(), config=config)
    for name, module in layers.items():
        gbar = report.stats[name].mean_grad.double().numpy()
        a = module.lora_A["default"].weight.detach().double()
        r = a.shape[0]
        wanted, task_span = [], []
        for factors, out in ((keep[name], wanted), (report.stats[name], task_span)):
            s_a, s_g = _damped(factors.input_cov), _damped(factors.grad_cov)
            out.append(_top_generalized(gbar.T @ np.linalg.solve(s_g, gbar), s_a, r)[1])
        np.testing.assert_allclose(_inside(a, _span(wanted[0])), 1.0, atol=1e-4)
        assert _inside(a, _span(task_span[0])).min() < 0.99
        x = seen[name].double()
        kaiming = r * x.pow(2).sum(1).mean() / (3 * x.shape[1])
        torch.testing.assert_close((x @ a.T).pow(2).sum(1).mean(), kaiming, rtol=1e-4, atol=0)


def _greedy_oracle(model, prompt: list[int], eos: int, steps: int) -> list[int]:
    """Plain greedy decoding, one token per full forward, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt) :]


def test_own_answers_are_chat_rendered_greedy_and_deterministic():
    tokenizer = train_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    made = keep_data(_cfg(keep_knowledge=True, num_batches=4), tokenizer)
    batches, again = made.make(model), made.make(model)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again, strict=True) for k in a)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(instructions()) == 32
    first = batches[0]
    for row in range(3):
        supervised = first["labels"][row] != -100
        start = int(supervised.nonzero()[0])
        prompt = first["input_ids"][row, :start].tolist()
        assert tokenizer.decode(prompt) == f"<|user|>{instructions()[row]}{tokenizer.eos_token}<|assistant|>"
        answer = first["labels"][row, supervised].tolist()
        assert answer == _greedy_oracle(model, prompt, tokenizer.eos_token_id, 48)
        assert torch.equal(first["input_ids"][row, start : start + len(answer)], torch.tensor(answer))


def test_own_answer_prompts_are_shared_out_by_whole_batches_in_equal_numbers_of_batches():
    """For 1–6 batches a process and 1–5 processes: each process answers at most what its pass reads
    (`num_batches` batches) and every process the same number of batches (on sharded parameters each `generate`
    and forward is a collective); where they are shared out, whole batches that together are exactly the prompts,
    the set one process reading `num_batches · processes` batches makes (the statistics do not depend on the
    count)."""
    from fisher_core.keep.answers import BATCH_SIZE, plan_share, process_share

    available = [[i] for i in range(len(instructions()))]
    batches = [available[i : i + BATCH_SIZE] for i in range(0, len(available), BATCH_SIZE)]
    assert process_share(available, 2, 1, shared=True) == batches[1] + batches[3]  # round-robin, whole batches
    assert plan_share(32, 2, 2) == (32, True) and plan_share(28, 2, 2) == (28, True)  # a short last batch
    assert plan_share(32, 3, 3) == (24, False)  # 4 batches do not split over 3: 3 batches, not shared
    for num_batches in range(1, 7):
        for world in range(1, 6):
            share = plan_share(len(available), num_batches, world)
            prompts = available[: share.count]
            shares = [process_share(prompts, world, rank, share.shared) for rank in range(world)]
            assert all(len(mine) <= BATCH_SIZE * num_batches for mine in shares), (num_batches, world)
            assert len({-(-len(mine) // BATCH_SIZE) for mine in shares}) == 1, (num_batches, world)
            if share.shared:
                assert sorted(p for mine in shares for p in mine) == prompts
                assert prompts == available[: plan_share(len(available), num_batches * world, 1).count]


def test_own_answers_without_a_chat_template_use_the_plain_instruction():
    tokenizer = train_tokenizer()
    tokenizer.chat_template = None
    model = tiny_llama(vocab_size=len(tokenizer))
    batch = keep_data(_cfg(keep_knowledge=True), tokenizer).make(model)[0]
    start = int((batch["labels"][0] != -100).nonzero()[0])
    assert batch["input_ids"][0, :start].tolist() == tokenizer(instructions()[0] + "\n")["input_ids"]


def test_keep_statistics_are_computed_once_and_cached_beside_the_task_statistics(tmp_path, caplog):
    cache = tmp_path / "stats.safetensors"
    states = []
    for _ in range(2):
        model, tokenizer = _peft()
        with caplog.at_level(logging.INFO, logger="fisher_core"):
            initialize(model, _task_batches(), config=_cfg(keep_knowledge=True, cache_path=cache), tokenizer=tokenizer)
        states.append(_lora(model))
    assert (tmp_path / "stats.keep.safetensors").is_file()
    assert sum("own greedy answers" in r.getMessage() for r in caplog.records) == 1
    assert sum("reusing cached statistics" in r.getMessage() for r in caplog.records) == 2  # task and keep
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=0, atol=0)
    other = [{**b, "input_ids": b["input_ids"].flip(1)} for b in _task_batches()]
    model, tokenizer = _peft()
    with pytest.raises(CacheMismatchError, match=r"stats\.keep\.safetensors was computed with data="):
        initialize(model, _task_batches(), config=_cfg(keep_knowledge=True, keep_data=other, cache_path=cache))
    (tmp_path / "stats.safetensors").unlink()  # the task's cache would refuse another model first
    model, tokenizer = _peft(seed=1)
    with pytest.raises(CacheMismatchError, match=r"stats\.keep\.safetensors was computed from other model weights"):
        initialize(model, _task_batches(), config=_cfg(keep_knowledge=True, cache_path=cache), tokenizer=tokenizer)


def _unread():
    raise AssertionError("the task data was read before the keep data was checked")
    yield


def test_generated_keep_data_without_a_tokenizer_is_one_line_before_the_pass():
    model, _ = _peft()
    before = _lora(model)
    with pytest.raises(ValueError, match=r"needs the model's tokenizer: pass tokenizer=\.\.\. to initialize") as err:
        initialize(model, _unread(), config=_cfg(keep_knowledge=True))
    assert "\n" not in str(err.value)
    for name, value in _lora(model).items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"keep_knowledge": True, "keep_data": "no-such.jsonl"}, "no-such.jsonl: no such file"),
        ({"keep_knowledge": True, "keep_data": []}, "an empty list of batches"),
        ({"keep_knowledge": False, "keep_data": "__FILE__"}, "keep_data is only read with keep_knowledge=True"),
        ({"keep_data": "__FILE__", "selector": "subspace"}, "keep_data is read by keep_knowledge, which needs"),
        ({"keep_knowledge": True, "selector": "subspace"}, "use selector='natural'"),
        (
            {"keep_knowledge": True, "keep_data": [{"input_ids": torch.ones(1, 3, dtype=torch.long)}]},
            "keep batch 0 has no 'labels'",
        ),
        (
            {
                "keep_knowledge": True,
                "keep_data": [{"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.full((1, 3), -100)}],
            },
            "every keep batch's labels are -100",
        ),
    ],
)
def test_bad_keep_settings_are_refused_naming_the_fix(kwargs, expected):
    kwargs = {k: __file__ if v == "__FILE__" else v for k, v in kwargs.items()}
    with pytest.raises(ValidationError, match=expected):
        FisherConfig(**kwargs)


def test_a_keep_data_file_needs_the_tokenizer_and_one_without_supervised_rows_is_refused(tmp_path):
    path = tmp_path / "keep.jsonl"
    path.write_text('{"text": "the quick brown fox"}\n')
    with pytest.raises(ValueError, match=r"reads keep_data .*keep\.jsonl, which needs the model's tokenizer"):
        keep_data(_cfg(keep_knowledge=True, keep_data=path), None)
    batches = keep_data(_cfg(keep_knowledge=True, keep_data=path), train_tokenizer()).make(None)
    assert (batches[0]["labels"] != -100).any()
    path.write_text('{"messages": [{"role": "user", "content": "no answer to keep"}]}\n')
    with pytest.raises(ValueError, match="has no row with a supervised token"):
        keep_data(_cfg(keep_knowledge=True, keep_data=path), train_tokenizer())


def test_a_keep_data_file_in_no_known_format_names_the_keep_data_and_the_formats(tmp_path):
    path = tmp_path / "keep.jsonl"
    path.write_text('{"question": "kept?"}\n')
    with pytest.raises(ValueError, match=r"^keep_data: .*keep\.jsonl:1: cannot tell the data format") as err:
        keep_data(_cfg(keep_knowledge=True, keep_data=path), train_tokenizer())
    assert "expected 'text', 'prompt'+'completion' or 'messages'" in str(err.value)
    assert "--text-field" not in str(err.value)  # the CLI's --data flags do not apply to keep data


def test_own_answers_from_a_model_that_cannot_generate_are_refused_before_the_pass():
    from transformers import LlamaForSequenceClassification

    tokenizer = train_tokenizer()
    config = tiny_llama(vocab_size=len(tokenizer)).config
    config.num_labels, config.pad_token_id = 2, tokenizer.pad_token_id
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="SEQ_CLS")
    model = get_peft_model(LlamaForSequenceClassification(config), lora)
    before = _lora(model)
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification cannot generate .*: pass keep_data") as err:
        initialize(model, _unread(), config=_cfg(keep_knowledge=True), tokenizer=tokenizer)
    assert "\n" not in str(err.value)
    for name, value in _lora(model).items():
        assert torch.equal(value, before[name])


def _init_lora(config: FisherConfig, tokenizer, model=None, caplog=None):
    """(the report, the written LoRA factors) of `initialize` on `_task_batches()` of a fresh `_peft()` model."""
    model = model or _peft()[0]
    report = initialize(model, _task_batches(), config=config, tokenizer=tokenizer)
    return report, _lora(model)


def _no_template():
    tokenizer = train_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


@pytest.mark.parametrize(
    ("tokenizer", "settings", "on", "why"),
    [
        (train_tokenizer, {}, True, "a chat model: keeps its own answers"),
        (lambda: None, {}, False, "no tokenizer to make keep data with; pass tokenizer="),
        (_no_template, {}, False, "not a chat model (its tokenizer has no chat template)"),
        (lambda: None, {"keep_data": _keep_batches()}, True, "keep_data given"),
        (train_tokenizer, {"selector": "subspace"}, False, "selector 'subspace' reads no mean gradient"),
    ],
)
def test_auto_keep_mode_is_on_for_a_chat_model_or_given_keep_data_and_equals_the_explicit_switch(
    tokenizer, settings, on, why, caplog
):
    """`keep_knowledge='auto'` (the default) writes exactly what the explicit switch it resolves to writes, says
    which and why in one log line, and reports the switch that ran; on and off write different factors here."""
    tokenizer = tokenizer()
    with caplog.at_level(logging.INFO, logger="fisher_core"):
        report, auto = _init_lora(_cfg(**settings), tokenizer)
    assert f"keep_knowledge 'auto' is {'on' if on else 'off'}: {why}" in caplog.text
    assert report.keep_knowledge is on
    explicit = {k: v for k, v in settings.items() if on or k != "keep_data"}
    _, want = _init_lora(_cfg(keep_knowledge=on, **explicit), tokenizer)
    for name in want:
        torch.testing.assert_close(auto[name], want[name], rtol=0, atol=0)
    if on:  # the comparison tells the two apart
        _, off = _init_lora(_cfg(keep_knowledge=False), tokenizer)
        assert any(not torch.allclose(auto[n], off[n]) for n in want if "lora_A" in n)


def test_auto_keep_mode_is_off_for_a_model_that_cannot_generate_without_refusing(caplog):
    from transformers import LlamaForSequenceClassification

    tokenizer = train_tokenizer()
    config = tiny_llama(vocab_size=len(tokenizer)).config
    config.num_labels, config.pad_token_id = 2, tokenizer.pad_token_id
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="SEQ_CLS")
    model = get_peft_model(LlamaForSequenceClassification(config), lora)
    batches = [{**_task_batches()[0], "labels": torch.tensor([0, 1, 0, 1])}]
    with caplog.at_level(logging.INFO, logger="fisher_core"):
        report = initialize(model, batches, config=_cfg(), tokenizer=tokenizer)
    assert report.keep_knowledge is False
    assert "keep_knowledge 'auto' is off: LlamaForSequenceClassification cannot generate" in caplog.text


def test_cli_flags_pass_the_keep_keys_through(tmp_path):
    from fisher_core.cli import build_parser, fisher_config

    keep = tmp_path / "keep.jsonl"
    keep.write_text('{"text": "kept"}\n')
    args = build_parser().parse_args(
        ["init", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o"), "--keep-knowledge",
         "--keep-data", str(keep)]
    )  # fmt: skip
    config = fisher_config(args)
    assert config.keep_knowledge is True and config.keep_data == keep
    common = ["init", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    assert fisher_config(build_parser().parse_args([*common, "--no-keep-knowledge"])).keep_knowledge is False
    assert fisher_config(build_parser().parse_args(common)).keep_knowledge == "auto"


def test_cli_missing_keep_data_exits_2_with_one_line_naming_the_flag(tmp_path, capsys):
    from fisher_core.cli import main

    argv = ["init", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path), "--keep-knowledge",
            "--keep-data", "missing.jsonl"]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fisher-lora init: error: --keep-data: missing.jsonl: no such file")


def test_trl_callback_and_axolotl_keys_pass_the_keep_keys_through(tmp_path):
    from fisher_trl import FisherInitCallback

    keep = tmp_path / "keep.jsonl"
    keep.write_text('{"text": "kept"}\n')
    want = FisherConfig(keep_knowledge=True, keep_data=keep)
    assert FisherInitCallback(keep_knowledge=True, keep_data=keep).config == want
    pytest.importorskip("axolotl")  # the latest tested set has no axolotl
    from fisher_axolotl.args import FisherArgs, fisher_config

    yaml = {"lora_init": "fisher", "fisher_keep_knowledge": True, "fisher_keep_data": str(keep)}
    assert fisher_config(FisherArgs(**yaml)) == want
    with pytest.raises(ValidationError, match=r"fisher_keep_data: Value error, .*no such file"):
        FisherArgs(**{**yaml, "fisher_keep_data": str(tmp_path / "missing.jsonl")})
    for value, want in (("auto", "auto"), (False, False), ("false", False)):  # YAML and the TRL recipes' strings
        assert fisher_config(FisherArgs(lora_init="fisher", fisher_keep_knowledge=value)).keep_knowledge == want
    with pytest.raises(ValidationError, match="fisher_keep_knowledge"):
        FisherArgs(lora_init="fisher", fisher_keep_knowledge="sometimes")
