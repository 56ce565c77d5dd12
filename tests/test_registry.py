"""The run-time registry (weight → attached site) lives and dies with its model."""
import gc

import torch

import modes_fx
from modes_fx import runtime
from modes_fx.sites import find_moe_sites, site_parameters
from modes_fx.harness.testing import build


def _router_weight(model):
    return site_parameters(model, find_moe_sites(model)[0])["router_weight"]


def test_a_deleted_model_leaves_no_entry_and_restores_the_recompile_limit():
    limit = torch._dynamo.config.recompile_limit
    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    assert runtime._STATES and runtime._ROLES
    assert torch._dynamo.config.recompile_limit == max(limit, runtime.RECOMPILE_LIMIT)
    del model
    gc.collect()
    assert runtime._STATES == [] and runtime._ROLES == {} and runtime._BY_OBJECT == {}
    assert torch._dynamo.config.recompile_limit == limit


def test_detach_restores_the_recompile_limit_and_forgets_the_weights():
    limit = torch._dynamo.config.recompile_limit
    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    weight = _router_weight(model)
    assert runtime.role_of(weight).role == "router_weight"
    modes_fx.detach(model)
    assert runtime.role_of(weight) is None and runtime._STATES == []
    assert torch._dynamo.config.recompile_limit == limit


def test_a_new_model_never_resolves_to_a_dead_one():
    old = build("qwen3_moe", seed=1)
    modes_fx.attach(old, modes_fx.Schedule.constant(old, tau={}))
    addresses = {runtime.weight_key(p) for p in site_parameters(old, find_moe_sites(old)[0]).values()}
    del old
    gc.collect()
    new = build("qwen3_moe", seed=2)  # allocated after the old model's storage was freed
    for param in new.parameters():
        assert runtime.role_of(param) is None
    # precondition: the allocator handed freed addresses out again (what made an address-keyed
    # registry without finalizers resolve a new tensor to the dead model)
    assert any(runtime.weight_key(p) in addresses for p in new.parameters())


def test_a_moved_weight_is_not_resolved_at_its_old_address():
    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={}))
    try:
        weight = _router_weight(model)
        old_address = runtime.weight_key(weight)
        assert runtime.role_of(weight) is not None
        weight.data = weight.data.clone()  # what model.to(...) does to every parameter
        stale = runtime._ROLES[old_address]
        assert not runtime._current(stale, old_address)
        # the Parameter object is the same: found by object, addresses not even re-read
        assert runtime.role_of(weight) is not None and runtime.role_of(weight).tensor() is weight
        # a tensor aliasing it at its new address: the addresses are re-read once
        assert runtime.role_of(weight.detach()).tensor() is weight
        assert old_address not in runtime._ROLES
    finally:
        modes_fx.detach(model)


def test_compiled_calls_find_their_site_without_walking_the_model(monkeypatch):
    """After attach, every lookup of the op's hot path is a hit by object: neither the model's
    modules nor the registered weights' addresses are read again, even after model.to()."""
    from modes_fx.harness.testing import text_inputs

    model = build("qwen3_moe")
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.1}))
    rekeys, walks = [], []
    monkeypatch.setattr(runtime, "_rekey", lambda: rekeys.append(1))
    monkeypatch.setattr(runtime.AttachedState, "param_roles", lambda self: walks.append(1))
    torch._dynamo.reset()
    try:
        model.compile(backend="modes", options={"inner": "eager"})
        with torch.no_grad():
            model.to(torch.float64).to(torch.float32)  # moves every weight
            model(**text_inputs(model))
            rekeys.clear()  # compiling looked every graph input up (activations miss)
            with modes_fx.track() as t:
                model(**text_inputs(model))
                model(**text_inputs(model))
        assert t.calls == 4 and t.skipped > 0
        assert rekeys == [] and walks == []
    finally:
        from modes_fx.compiled import set_compiled_forward

        set_compiled_forward(model, None)
        torch._dynamo.reset()
        monkeypatch.undo()
        modes_fx.detach(model)
