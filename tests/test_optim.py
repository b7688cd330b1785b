"""LR schedules against their formulas; the scheduler drives the optimizer's lr; AdamW skips on found_inf."""

import math

import pytest
import torch

from fms_bamba.config import LRSchedulerSection, OptimizerSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.optim import build_lr_scheduler, build_optimizer, lr_at

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


def test_update_unit_by_unit_is_one_step():
    """optimizer.overlap_step updates the root's parameters, then each block's, as separate
    calls; with clipping, both param groups and a skipped step in between, three steps of it must
    leave the same weights and moments, to the bit, as the whole step. (The stream and the
    all-gather waits are CUDA's; this is the arithmetic they carry.)"""
    from fms_bamba.optim import UpdateBesideForward
    from fms_bamba.train import global_grad_norm, set_clipping_and_skipping

    models = [tiny_model(), tiny_model()]
    optimizers = [build_optimizer(m, OptimizerSection(lr=1e-2)) for m in models]
    update = UpdateBesideForward(models[1], optimizers[1])
    assert len(update.unit_groups) == 1 + len(models[1].layers)
    assert sum(len(params) for groups in update.unit_groups for params in groups) == len(list(models[1].parameters()))
    for step in range(3):
        ids = torch.randint(0, 4096, (2, 17), generator=torch.Generator().manual_seed(step))
        for model, optimizer, step_fn in zip(models, optimizers, (optimizers[0].step, update)):
            model(ids[:, :-1], labels=ids[:, 1:]).backward()
            set_clipping_and_skipping(optimizer, global_grad_norm(list(model.parameters())), 0.05,
                                      torch.tensor(step == 1))
            step_fn()
            optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
        assert all(torch.equal(optimizers[0].state[a][k], optimizers[1].state[b][k]) for k in optimizers[0].state[a]), name
    assert [len(g["params"]) for g in optimizers[1].param_groups] == [len(g["params"]) for g in optimizers[0].param_groups]
