"""LR schedules against their formulas; the scheduler drives the optimizer's lr; AdamW skips on found_inf;
the fp32-master AdamW against torch's fused one."""

import math

import pytest
import torch

from fms_bamba.config import LRSchedulerSection, OptimizerSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.optim import (
    MasterWeightAdamW,
    adamw_with_masters,
    build_lr_scheduler,
    build_optimizer,
    copy_to_model,
    lr_at,
    master_weights,
    paired_parameters,
)

PEAK, FLOOR, TOTAL, WARMUP = 3e-4, 1e-5, 1000, 100


def schedule(**fields) -> LRSchedulerSection:
    return LRSchedulerSection(**{"warmup_steps": WARMUP, "min_lr": FLOOR, **fields})


@pytest.mark.parametrize("shape, step, expected", [
    ("linear", 0, PEAK * 1 / WARMUP),
    ("linear", 49, PEAK * 50 / WARMUP),
    ("linear", 99, PEAK),
    ("quadratic", 0, PEAK * (1 / WARMUP) ** 2),
    ("quadratic", 49, PEAK * 0.25),
])
def test_warmup(shape, step, expected):
    assert lr_at(step, peak_lr=PEAK, total_steps=TOTAL, cfg=schedule(warmup_shape=shape)) == pytest.approx(expected)


@pytest.mark.parametrize("decay, step, expected", [
    ("cosine", 100, PEAK),
    ("cosine", 550, FLOOR + (PEAK - FLOOR) * 0.5),            # halfway: cos(pi/2) = 0
    ("cosine", 325, FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", 1000, FLOOR),
    ("cosine", 5000, FLOOR),                                   # past the end: stays at the floor
    ("linear", 100, PEAK),
    ("linear", 550, (PEAK + FLOOR) / 2),
    ("linear", 1000, FLOOR),
    ("constant", 100, PEAK),
    ("constant", 999, PEAK),
    # wsd with 20% decay: stable until step 800, then linear to the floor at step 1000.
    ("wsd", 100, PEAK),
    ("wsd", 799, PEAK),
    ("wsd", 800, PEAK),
    ("wsd", 900, (PEAK + FLOOR) / 2),
    ("wsd", 1000, FLOOR),
])
def test_decay(decay, step, expected):
    cfg = schedule(decay=decay, wsd_decay_fraction=0.2)
    assert lr_at(step, peak_lr=PEAK, total_steps=TOTAL, cfg=cfg) == pytest.approx(expected, rel=1e-12)


def test_no_warmup_starts_at_peak():
    assert lr_at(0, peak_lr=2e-5, total_steps=10, cfg=LRSchedulerSection(warmup_steps=0, min_lr=0.0)) == 2e-5


@pytest.mark.parametrize("field, value, message", [
    ("warmup_shape", "cubic", "lr_scheduler.warmup_shape"),
    ("decay", "exp", "lr_scheduler.decay"),
    ("warmup_steps", 2000, "lr_scheduler.warmup_steps"),
    ("min_lr", 1.0, "lr_scheduler.min_lr"),
])
def test_bad_schedule_names_field(field, value, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    with pytest.raises(ValueError, match=message):
        build_lr_scheduler(optimizer, schedule(**{field: value}), peak_lr=PEAK, total_steps=TOTAL)


def tiny_model() -> Bamba:
    torch.manual_seed(0)
    return Bamba(BambaConfig.from_preset("tiny", max_seq_len=32))


def test_scheduler_sets_optimizer_lr_and_resumes():
    optimizer = build_optimizer(tiny_model(), OptimizerSection(lr=PEAK))
    scheduler = build_lr_scheduler(optimizer, schedule(), peak_lr=PEAK, total_steps=TOTAL)
    assert {g["lr"] for g in optimizer.param_groups} == {PEAK / WARMUP}
    for _ in range(150):
        scheduler.step()
    expected = lr_at(150, peak_lr=PEAK, total_steps=TOTAL, cfg=schedule())
    assert {g["lr"] for g in optimizer.param_groups} == {expected}
    # A loaded optimizer state brings its own lr; loading the scheduler state puts the schedule's back.
    for group in optimizer.param_groups:
        group["lr"] = 123.0
    fresh = build_lr_scheduler(optimizer, schedule(), peak_lr=PEAK, total_steps=TOTAL)
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.state_dict() == {"step": 150}
    assert {g["lr"] for g in optimizer.param_groups} == {expected}


def test_found_inf_skips_the_update():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimizerSection(lr=1e-2))
    assert any(g["weight_decay"] == 0 for g in optimizer.param_groups)
    ids = torch.randint(0, 4096, (2, 17))
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    optimizer.found_inf = torch.zeros(())
    optimizer.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_adamw_state_exists_before_the_first_step_and_changes_nothing():
    """build_optimizer's AdamW holds its state from the start (a checkpoint loads into it; its
    host copy is allocated before a save); three steps of it equal torch's fused AdamW whose state
    is made at its first step, to the bit."""
    models = [tiny_model(), tiny_model()]
    optimizers = [build_optimizer(models[0], OptimizerSection(lr=1e-2)),
                  torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                     for g in build_optimizer(models[1], OptimizerSection()).param_groups],
                                    lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)]
    assert optimizers[1].state == {} and len(optimizers[0].state) == len(list(models[0].parameters()))
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() for s in optimizers[0].state.values())
    for step in range(3):
        ids = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip(models, optimizers):
            model(ids[:, :-1], labels=ids[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
        assert all(torch.equal(optimizers[0].state[a][k], optimizers[1].state[b][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e6, 0.0])  # clipped, under the limit, clipping off
def test_clipping_inside_the_fused_step_matches_clip_grad_norm(max_grad_norm):
    """The trainer clips through the fused AdamW's grad_scale; three steps of it must equal
    clip_grads_with_norm_ followed by a plain step. A large eps makes the update proportional to
    the gradient (Adam itself is blind to a constant gradient scale), so clipping shows."""
    from fms_bamba.train import global_grad_norm, set_clipping_and_skipping

    models = [tiny_model(), tiny_model()]  # same seed, same weights
    optimizers = [build_optimizer(m, OptimizerSection(lr=1e-2, eps=1.0)) for m in models]
    for step in range(3):
        ids = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(step))
        for model in models:
            model(ids[:, :-1], labels=ids[:, 1:]).backward()
        norms = [global_grad_norm(list(m.parameters())) for m in models]
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
        if max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(list(models[0].parameters()), max_grad_norm, norms[0], foreach=True)
        set_clipping_and_skipping(optimizers[1], norms[1], max_grad_norm, torch.zeros((), dtype=torch.bool))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("masters", [False, True])
def test_update_unit_by_unit_is_one_step(masters):
    """optimizer.overlap_step updates the root's parameters, then each block's, as separate
    calls; with clipping, both param groups and a skipped step in between, three steps of it must
    leave the same weights and moments, to the bit, as the whole step, with or without fp32
    masters. (The stream and the all-gather waits are CUDA's; this is the arithmetic they carry.)"""
    from fms_bamba.optim import UpdateBesideForward
    from fms_bamba.train import global_grad_norm, set_clipping_and_skipping

    pairs = [tiny_master_model() if masters else (tiny_model(),) * 2 for _ in range(2)]
    optimizers = [build_optimizer(model, OptimizerSection(lr=1e-2, master_weights=masters), weights=weights)
                  for model, weights in pairs]
    update = UpdateBesideForward(pairs[1][0], optimizers[1])
    assert len(update.unit_groups) == 1 + len(pairs[1][0].layers)
    assert sum(len(params) for groups in update.unit_groups for params in groups) == len(list(pairs[1][0].parameters()))
    for step in range(3):
        ids = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(step))
        for (model, _), optimizer, step_fn in zip(pairs, optimizers, (optimizers[0].step, update)):
            model(ids[:, :-1], labels=ids[:, 1:]).backward()
            set_clipping_and_skipping(optimizer, global_grad_norm(list(model.parameters())), 0.05,
                                      torch.tensor(step == 1))
            step_fn()
            optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(pairs[0][1].named_parameters(), pairs[1][1].parameters()):
        assert torch.equal(a, b), name
        assert all(torch.equal(optimizers[0].state[a][k], optimizers[1].state[b][k]) for k in optimizers[0].state[a]), name
    assert [len(g["params"]) for g in optimizers[1].param_groups] == [len(g["params"]) for g in optimizers[0].param_groups]


def tiny_master_model() -> tuple[Bamba, Bamba]:
    """tiny_model() in bf16, and its fp32 masters holding tiny_model()'s fp32 weights."""
    model = tiny_model()
    weights = master_weights(model)
    with torch.no_grad():
        for master, param in paired_parameters(model, weights):
            master.copy_(param)
    model.to(torch.bfloat16)
    copy_to_model(weights, model)
    return model, weights


def test_master_weight_adamw_is_fused_adamw_on_the_masters():
    """Three steps (clipped, skipped, plain) from the same bf16 gradients: the masters and moments
    follow torch's fused AdamW on fp32 weights, the bf16 parameters are the masters rounded, and
    zero_grad clears the model's gradients."""
    from fms_bamba.train import global_grad_norm, set_clipping_and_skipping

    reference = tiny_model()
    model, weights = tiny_master_model()
    optimizers = [build_optimizer(reference, OptimizerSection(lr=1e-2)),
                  build_optimizer(model, OptimizerSection(lr=1e-2, master_weights=True), weights=weights)]
    assert isinstance(optimizers[1], MasterWeightAdamW) and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for ref, param in zip(reference.parameters(), model.parameters()):
            param.grad = torch.randn(param.shape, generator=generator).bfloat16()
            ref.grad = param.grad.float()
        norms = [global_grad_norm(list(m.parameters())) for m in (reference, model)]
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=0)
        for optimizer, norm in zip(optimizers, norms):
            set_clipping_and_skipping(optimizer, norm, 5.0 if step == 0 else 0.0, torch.tensor(step == 1))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    for (name, ref), (master, param) in zip(reference.named_parameters(), paired_parameters(model, weights)):
        torch.testing.assert_close(master, ref, msg=name)
        assert torch.equal(param, master.bfloat16()), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizers[1].state[master][key], optimizers[0].state[ref][key], msg=name)
    assert optimizers[1].state[master]["step"].item() == 2  # the skipped step did not count


def test_bfloat16_moments_are_the_fp32_update_rounded_once():
    """optimizer.moments_dtype=bfloat16: the moments are kept in bf16, and each step's are the fp32
    formula applied to the kept (bf16) moments, rounded once when written back, with the master
    moving by the same formula from them; a float32 run's moments stay within bf16's rounding of
    them after a few steps, and the masters close."""
    from fms_bamba.train import global_grad_norm, set_clipping_and_skipping

    pairs = [tiny_master_model() for _ in range(2)]
    optimizers = [build_optimizer(model, OptimizerSection(lr=1e-2, master_weights=True, moments_dtype=dtype),
                                  weights=weights) for (model, weights), dtype in zip(pairs, ("float32", "bfloat16"))]
    assert {s[k].dtype for s in optimizers[1].state.values() for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    beta1, beta2 = optimizers[1].param_groups[0]["betas"]
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=generator).bfloat16() for p in pairs[0][0].parameters()]
        before = {m: {k: v.clone() for k, v in optimizers[1].state[m].items()} for m in pairs[1][1].parameters()}
        for (model, _), optimizer in zip(pairs, optimizers):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            set_clipping_and_skipping(optimizer, global_grad_norm(list(model.parameters())), 0.0, torch.tensor(False))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for (master, _), grad in zip(paired_parameters(*pairs[1]), grads):
            old, new = before[master], optimizers[1].state[master]
            assert new["exp_avg"].dtype == torch.bfloat16 and new["step"].item() == step + 1
            assert torch.equal(new["exp_avg"], (old["exp_avg"].float() * beta1 + grad.float() * (1 - beta1)).bfloat16())
            assert torch.equal(new["exp_avg_sq"],
                               (old["exp_avg_sq"].float() * beta2 + grad.float() ** 2 * (1 - beta2)).bfloat16())
    def relative(got: torch.Tensor, exact: torch.Tensor) -> float:
        return ((got.float() - exact).norm() / exact.norm()).item()

    for (name, a), b in zip(pairs[0][1].named_parameters(), pairs[1][1].parameters()):
        errors = [relative(optimizers[1].state[b][k], optimizers[0].state[a][k]) for k in ("exp_avg", "exp_avg_sq")]
        assert max(errors) < 2 ** -8, (name, errors)  # bf16 keeps 8 bits: a few roundings of 2^-9 each
        assert relative(b, a) < 1e-3, name


def test_compiled_master_update_matches_eager():
    """The update as the trainer runs it on CUDA (compiled into one pass per tensor) equals the
    eager function it is compiled from; a skipped step leaves every tensor as it was."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (48,), (3, 5, 7)]

    def tensors() -> list[list[torch.Tensor]]:
        masters = [torch.randn(s, generator=generator) for s in shapes]
        grads = [torch.randn(s, generator=generator).bfloat16() for s in shapes]
        exp_avgs = [torch.randn(s, generator=generator) for s in shapes]
        exp_avg_sqs = [torch.rand(s, generator=generator) for s in shapes]
        return [masters, grads, exp_avgs, exp_avg_sqs, [m.bfloat16() for m in masters],
                [torch.tensor(4.0) for _ in shapes]]

    eager = tensors()
    compiled = [[t.clone() for t in group] for group in eager]
    hyper = {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    scale = torch.tensor(1.7)
    adamw_with_masters(*eager, torch.tensor(3e-3), scale, torch.tensor(0.0), **hyper)
    update = torch.compile(adamw_with_masters, fullgraph=True)
    update(*compiled, torch.tensor(3e-3), scale, torch.tensor(0.0), **hyper)
    for group_e, group_c in zip(eager, compiled):
        for e, c in zip(group_e, group_c):
            torch.testing.assert_close(c, e, rtol=2e-6, atol=1e-7)
    before = [[t.clone() for t in group] for group in compiled]
    update(*compiled, torch.tensor(3e-3), scale, torch.tensor(1.0), **hyper)
    assert all(torch.equal(b, c) for gb, gc in zip(before, compiled) for b, c in zip(gb, gc))
