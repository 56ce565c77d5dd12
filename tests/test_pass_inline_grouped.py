"""The device-side kernel inlined into the graph (RewriteMaskedDispatch's ``dispatch``): which
sites get the traceable function instead of the opaque op, which must not, and that the result
computes what the op does and traces through AOTAutograd as inductor traces it (on CPU; CUDA is
where ``dispatch="auto"`` picks it)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modes_fx
from graph_capture import capture, count_targets
from modes_fx import runtime
from modes_fx.harness.testing import build, text_inputs
from modes_fx.kernels.grouped import masked_experts_grouped, traceable
from modes_fx.kernels.reference import masked_experts_reference
from modes_fx.passes.rewrite_masked_dispatch import RewriteMaskedDispatch
from test_op_masked_experts import make_case

OP = "modes.masked_experts.default"
INLINE = str(masked_experts_grouped)
LAYERS = 3


def _captured(dtype):
    model = build("qwen3_moe", experts_implementation="grouped_mm", num_hidden_layers=LAYERS).to(dtype)
    modes_fx.attach(model, modes_fx.Schedule.constant(model, tau={"text": 0.3}))
    (graph,) = capture(model, text_inputs(model))
    return model, graph


@pytest.fixture(scope="module")
def bf16():
    model, graph = _captured(torch.bfloat16)
    yield model, graph
    modes_fx.detach(model)


@pytest.mark.parametrize("dispatch, inlined", [("inline", LAYERS), ("auto", 0), ("op", 0)])
def test_inline_replaces_the_op_at_every_site_and_auto_keeps_the_op_on_cpu(bf16, dispatch, inlined):
    _, graph = bf16
    p = RewriteMaskedDispatch(graph.resolve, dispatch)
    counts = count_targets(p(graph.gm).graph_module)
    assert counts[INLINE] == inlined and counts[OP] == LAYERS - inlined
    assert counts["modes.route_mask.default"] == LAYERS
    assert {r.kernel for r in p.rewrites} == {"inline grouped_mm" if inlined else "modes::masked_experts"}


def test_fp32_weights_are_never_inlined():
    """torch._grouped_mm's meta function takes bf16 only: fp32 sites keep the op even when asked."""
    model, graph = _captured(torch.float32)
    try:
        counts = count_targets(RewriteMaskedDispatch(graph.resolve, "inline")(graph.gm).graph_module)
        assert counts[INLINE] == 0 and counts[OP] == LAYERS
    finally:
        modes_fx.detach(model)


def test_unknown_dispatch_is_refused_by_name(bf16):
    with pytest.raises(ValueError, match="unknown dispatch 'grouped'"):
        RewriteMaskedDispatch(bf16[1].resolve, "grouped")


def test_inlined_graph_computes_what_the_op_graph_does(bf16):
    model, graph = bf16
    state = runtime.state_of(model)
    inputs = text_inputs(model)
    outputs = {}
    for dispatch in ("inline", "op"):
        gm = RewriteMaskedDispatch(graph.resolve, dispatch)(graph.gm).graph_module
        with torch.no_grad(), modes_fx.track() as stats:
            state.begin_forward(inputs["input_ids"], inputs["attention_mask"])
            outputs[dispatch] = [t for t in torch.utils._pytree.tree_leaves(gm(*graph.example_inputs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            state.end_forward()
        assert 0.0 < stats.skip_ratio < 1.0  # some pairs skipped, some kept
    for got, expected in zip(outputs["inline"], outputs["op"], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_backend_option_reaches_the_pass_and_the_report(bf16):
    model, _ = bf16
    torch._dynamo.reset()
    modes_fx.reset_report()
    with torch.no_grad():
        torch.compile(model, backend="modes", options={"inner": "eager", "dispatch": "inline"})(**text_inputs(model))
    report = str(modes_fx.last_report())
    assert report.count("kernel=inline grouped_mm") == LAYERS
    torch._dynamo.reset()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.sampled_from((1, 3, 17)), mode=st.sampled_from(("random", "all_true", "all_false", "empty_rows")))
def test_the_inlined_function_traces_through_aot_autograd_and_stays_exact(seed, tokens, mode):
    """What inductor does with the inlined call: AOTAutograd traces it with fake tensors (the
    meta functions of every aten op in it) into one graph, which computes what eager does."""
    args = make_case(seed, tokens, 16, 8, 6, 2, mode)
    args = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]
    assert traceable(args[4], args[5])
    torch._dynamo.reset()
    compiled = torch.compile(masked_experts_grouped, backend="aot_eager", fullgraph=True, dynamic=False)
    got = compiled(*args, "silu")
    expected = masked_experts_reference(*args, "silu")
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_the_modes_ops_are_kept_out_of_cuda_graphs(bf16):
    """mode="reduce-overhead" must not replay route_mask (its thresholds and modality ids are
    read in Python per call) nor the op's host-syncing kernel: inductor's own test for what it
    partitions out of CUDA graphs says so for every modes node of a rewritten graph, and not for
    the inlined kernel's aten ops."""
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    import modes_fx.quant.int4_experts  # noqa: F401  (registers modes::masked_experts_int4)

    _, graph = bf16
    for dispatch, unsafe in (("op", 2 * LAYERS), ("inline", LAYERS)):
        gm = RewriteMaskedDispatch(graph.resolve, dispatch)(graph.gm).graph_module
        modes_nodes = [n for n in gm.graph.nodes if str(n.target).startswith("modes.")]
        assert sum(map(is_cudagraph_unsafe_fx_node, gm.graph.nodes)) == unsafe == len(modes_nodes)
    assert torch.Tag.cudagraph_unsafe in torch.ops.modes.masked_experts_int4.default.tags
