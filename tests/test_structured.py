"""FLAP structured pruning: layout discovery, scores, selection, surgery, saving (tiny random models)."""
from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from conftest import make_tiny_model

from ebft.errors import ConfigError, EbftError
from ebft.models import find_blocks
from ebft.stats import LayerStats
from ebft.structured import (ATTENTION, MLP, STATS_NEEDED, Structure, UnitScores, block_layout, block_scores,
                             channel_scores, make_saveable_, removed_fraction, save_shape, select_structure,
                             shrink_block_, standardise)

FAMILIES = ("llama", "qwen2", "mistral", "opt", "qwen3", "gemma2", "gemma3", "phi3", "llama-g3")


def tiny(arch: str, layers: int = 2, seed: int = 0):
    """Tiny fp32 models; families not in conftest are built here with grouped-query attention."""
    if arch in ("llama", "qwen2", "mistral", "opt"):
        return make_tiny_model(arch, vocab_size=100, layers=layers, seed=seed)
    torch.manual_seed(seed)
    common = dict(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    if arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **common))
    elif arch == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=16, **common))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=16, **common))
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        model = tf.Phi3ForCausalLM(tf.Phi3Config(bos_token_id=1, eos_token_id=2, pad_token_id=0, **common))
    elif arch == "llama-g3":  # 6 query heads sharing 2 KV heads: groups of g = 3
        common.update(hidden_size=96, num_attention_heads=6)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "llama-mha":  # 4 heads, 4 KV heads, hidden 64: 3 heads do not divide 64
        common.update(num_key_value_heads=4)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # as in conftest: larger weights so that pruning visibly matters
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def ids(seed: int = 1, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def collect_stats(model, x) -> list[dict[str, LayerStats]]:
    """A dense pass: the statistics of each block's output-projection inputs, keyed by linear name."""
    _, blocks = find_blocks(model)
    stats, hooks = [], []
    for block in blocks:
        layout, per_block = block_layout(block, model.config), {}
        for name in (layout.attention.out_proj, layout.mlp.out_proj):
            linear = block.get_submodule(name)
            per_block[name] = s = LayerStats(linear.in_features, STATS_NEEDED)
            hooks.append(linear.register_forward_hook(lambda m, inp, out, s=s: s.update(inp[0])))
        stats.append(per_block)
    logits(model, x)
    for h in hooks:
        h.remove()
    return stats


def flap(model, ratio, mode="adaptive", compensate=True, metric="WIFV", x=None):
    stats = collect_stats(model, ids() if x is None else x)
    _, blocks = find_blocks(model)
    scores = [block_scores(b, block_layout(b, model.config), s, metric) for b, s in zip(blocks, stats)]
    structures = select_structure(scores, ratio, mode)
    for block, structure, s in zip(blocks, structures, stats):
        shrink_block_(block, model.config, structure, s if compensate else None)
    return structures


def prunable_params(model) -> int:
    """Weights of the attention and MLP projections plus their input-side biases (what `ratio` counts)."""
    total = 0
    for block in find_blocks(model)[1]:
        layout = block_layout(block, model.config)
        outs = {layout.attention.out_proj, layout.mlp.out_proj}
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                total += m.weight.numel() + (m.bias.numel() if m.bias is not None and name not in outs else 0)
    return total


def structure(layout, drop_groups=(), drop_channels=()) -> Structure:
    a, m = layout.attention, layout.mlp
    return Structure(tuple(i for i in range(a.count) if i not in drop_groups),
                     tuple(i for i in range(m.count) if i not in drop_channels),
                     a.count, m.count, a.params_per_unit, m.params_per_unit)


@torch.no_grad()
def zero_units_(block, layout, kind, units) -> None:
    group = layout.units(kind)
    for u in units:
        for section in group.rows:
            linear = block.get_submodule(section.linear)
            linear.weight[list(section.span(u))] = 0
            if linear.bias is not None:
                linear.bias[list(section.span(u))] = 0
        block.get_submodule(group.cols.linear).weight[:, list(group.cols.span(u))] = 0


# --- layout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", FAMILIES)
def test_layout_matches_config(arch):
    model = tiny(arch)
    cfg = model.config
    layout = block_layout(find_blocks(model)[1][0], cfg)
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    width = getattr(cfg, "intermediate_size", None) or cfg.ffn_dim
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.intermediate_size) == \
        (cfg.num_attention_heads, kv, cfg.hidden_size // cfg.num_attention_heads, width)
    g, d, h = layout.group_size, layout.head_dim, layout.hidden_size
    bias_rows = (g + 2) * d if arch in ("qwen2", "opt") else 0  # q, k, v biases go with the group
    assert layout.attention.params_per_unit == (2 * g + 2) * d * h + bias_rows
    gated = arch != "opt"
    assert layout.mlp.params_per_unit == (3 if gated else 2) * h + (0 if gated else 1)  # fc1 has a bias


@pytest.mark.parametrize("build, match", [
    (lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(vocab_size=100, hidden_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, intermediate_size=96)),
     "depends on the head count"),
    (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=96)), "fused q/k/v"),
    (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=96, num_local_experts=2)), "MLP"),
    (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=1, n_head=4, n_positions=64)),
     "Conv1D"),
])
def test_unsupported_layouts_are_clear_errors(build, match):
    model = build()
    with pytest.raises(EbftError, match=match):
        block_layout(find_blocks(model)[1][0], model.config)


def test_heads_that_do_not_form_whole_groups_are_an_error():
    model = tiny("llama")
    block = find_blocks(model)[1][0]
    block.self_attn.k_proj = torch.nn.Linear(64, 24, bias=False)  # 1.5 KV heads of 16
    with pytest.raises(EbftError, match="whole KV groups"):
        block_layout(block, model.config)


# --- surgery ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", FAMILIES)
def test_removing_zeroed_units_changes_nothing(arch):
    model, x = tiny(arch), ids()
    blocks = find_blocks(model)[1]
    layouts = [block_layout(b, model.config) for b in blocks]
    drop_groups, drop_channels = (1,), (3, 7, 40)
    for block, layout in zip(blocks, layouts):
        zero_units_(block, layout, ATTENTION, drop_groups)
        zero_units_(block, layout, MLP, drop_channels)
    before, params_before = logits(model, x), prunable_params(model)
    stats = collect_stats(model, x)
    for block, layout, s in zip(blocks, layouts, stats):
        shrink_block_(block, model.config, structure(layout, drop_groups, drop_channels), s)
    after = logits(model, x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    removed = sum(lay.attention.params_per_unit + 3 * lay.mlp.params_per_unit for lay in layouts)
    assert params_before - prunable_params(model) == removed
    for block, old in zip(blocks, layouts):  # every projection agrees on the new sizes
        new = block_layout(block, model.config)
        assert (new.num_kv_heads, new.num_heads, new.intermediate_size) == \
            (old.num_kv_heads - 1, old.num_heads - old.group_size, old.intermediate_size - 3)
    assert model.config.num_attention_heads == layouts[0].num_heads  # the shared config is untouched


def test_gqa_group_removal_keeps_the_right_query_heads():
    """Removing KV group 0 of 6 query heads / 2 KV heads keeps q heads 3-5 with KV head 1, and the
    attention equals the dense one with group 0's o_proj columns zeroed."""
    model = tiny("llama-g3")
    block = find_blocks(model)[1][0]
    attn, layout = block.self_attn, block_layout(block, model.config)
    assert (layout.group_size, layout.num_kv_heads, layout.head_dim) == (3, 2, 16)
    q, k, v, o = (getattr(attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    hidden = torch.randn(2, 10, 96)
    position_ids = torch.arange(10).expand(2, -1)
    cos_sin = model.model.rotary_emb(hidden, position_ids)

    def attend():
        with torch.no_grad():
            return attn(hidden, position_embeddings=cos_sin, attention_mask=None)[0]

    with torch.no_grad():
        attn.o_proj.weight[:, :48] = 0
    reference = attend()
    attn.o_proj.weight.data.copy_(o)
    shrink_block_(block, model.config, structure(layout, drop_groups=(0,)), None)
    assert torch.equal(attn.q_proj.weight, q[48:]) and torch.equal(attn.o_proj.weight, o[:, 48:])
    assert torch.equal(attn.k_proj.weight, k[16:]) and torch.equal(attn.v_proj.weight, v[16:])
    assert attn.num_key_value_groups == 3 and attn.o_proj.bias is None  # no statistics: no compensation
    torch.testing.assert_close(attend(), reference, rtol=0, atol=1e-5)


def test_bias_compensation_keeps_the_mean_output():
    """On the calibration data, each pruned output projection's mean output equals the dense one."""
    model, x = tiny("qwen2"), ids()
    block = find_blocks(model)[1][0]
    layout = block_layout(block, model.config)
    inputs = {}

    def keep_input(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
        return hook

    hooks = [block.get_submodule(n).register_forward_hook(keep_input(n))
             for n in (layout.attention.out_proj, layout.mlp.out_proj)]
    logits(model, x)
    for h in hooks:
        h.remove()
    dense = {n: block.get_submodule(n)(inp).mean((0, 1)) for n, inp in inputs.items()}
    stats = {n: LayerStats.from_inputs(inp, STATS_NEEDED) for n, inp in inputs.items()}
    plan = structure(layout, drop_groups=(0,), drop_channels=tuple(range(0, 128, 3)))
    shrink_block_(block, model.config, plan, stats)
    kept_cols = {layout.attention.out_proj: list(range(32, 64)), layout.mlp.out_proj: list(plan.mlp_keep)}
    for name, inp in inputs.items():
        pruned = block.get_submodule(name)(inp[..., kept_cols[name]]).mean((0, 1))
        torch.testing.assert_close(pruned, dense[name], rtol=1e-5, atol=1e-4)
        linear = block.get_submodule(name)
        without = torch.nn.functional.linear(inp[..., kept_cols[name]], linear.weight).mean((0, 1))
        assert (without - dense[name]).abs().max() > 1e-2  # the removed channels did matter


def test_shrink_refuses_a_structure_for_another_shape():
    model = tiny("llama")
    block = find_blocks(model)[1][0]
    plan = structure(block_layout(block, model.config), drop_groups=(0,))
    shrink_block_(block, model.config, plan)
    with pytest.raises(EbftError, match="already shrunk"):
        shrink_block_(block, model.config, plan)


# --- scores -------------------------------------------------------------------------------------

def test_channel_scores_follow_the_formulas():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 4.0]])  # means 2, 2, 2; variances 1, 0, 4
    w = torch.tensor([[1.0, -2.0, 0.5], [1.0, 0.0, 0.5]])
    stats = LayerStats.from_inputs(x, STATS_NEEDED)
    torch.testing.assert_close(channel_scores(w, stats, "IFV"), torch.tensor([1.0, 0.0, 4.0]))
    torch.testing.assert_close(channel_scores(w, stats, "WIFV"), torch.tensor([2.0, 0.0, 2.0]))
    rms = torch.tensor([5.0, 4.0, 8.0]).sqrt()
    torch.testing.assert_close(channel_scores(w, stats, "WIFN"), rms * torch.tensor([1.0, 1.0, 0.5]))
    with pytest.raises(ConfigError, match="flap_metric"):
        channel_scores(w, stats, "L2")
    assert torch.equal(standardise(torch.ones(4)), torch.zeros(4))


def test_group_score_is_the_mean_of_its_standardised_channels():
    model, x = tiny("llama-g3"), ids()
    block = find_blocks(model)[1][0]
    layout = block_layout(block, model.config)
    stats = collect_stats(model, x)[0]
    scores = block_scores(block, layout, stats, "WIFV")
    o = layout.attention.out_proj
    channel = standardise(channel_scores(block.get_submodule(o).weight, stats[o], "WIFV").square())
    torch.testing.assert_close(scores.attention, torch.stack([channel[:48].mean(), channel[48:].mean()]))
    assert scores.mlp.shape == (96,) and abs(float(scores.mlp.mean())) < 1e-5


# --- selection ----------------------------------------------------------------------------------

def test_adaptive_ranks_all_units_globally_weighted_by_parameters():
    scores = [UnitScores(torch.tensor([-1.0, 1.0]), torch.tensor([-3.0, 0.0, 3.0]), 10, 1),
              UnitScores(torch.tensor([-2.0, 2.0]), torch.tensor([-0.5, -0.4, 5.0]), 10, 1)]
    total = 2 * (2 * 10 + 3)
    # candidates by score: mlp0:-3 (1), attn1:-2 (10), attn0:-1 (10), mlp1:-0.5 (1), mlp1:-0.4 (1), mlp0:0 (1)
    # cumulative: 1, 11, 21, 22, 23, 24; ratio 0.45 -> target 20.7 -> remove three (21)
    out = select_structure(scores, 0.45, "adaptive")
    assert [(s.attention_keep, s.mlp_keep) for s in out] == [((1,), (1, 2)), ((1,), (0, 1, 2))]
    assert removed_fraction(out) == 21 / total
    # everything requested: each block keeps its best KV group and channel (logged), never more
    out = select_structure(scores, 0.99, "adaptive")
    assert [(s.attention_keep, s.mlp_keep) for s in out] == [((1,), (2,)), ((1,), (2,))]


def test_uniform_removes_the_same_share_of_each_type_in_each_block():
    scores = [UnitScores(torch.tensor([0.5, -1.0, 2.0, 0.1]), torch.arange(10.0).flip(0), 10, 1)] * 2
    out = select_structure(scores, 0.3, "uniform")  # round(1.2) = 1 group, round(3) = 3 channels
    assert all(s.attention_keep == (0, 2, 3) and s.mlp_keep == tuple(range(7)) for s in out)
    out = select_structure(scores, 0.9, "uniform")  # capped: one of each is kept
    assert all(s.attention_keep == (2,) and s.mlp_keep == (0,) for s in out)


@pytest.mark.parametrize("arch", ["llama", "opt", "llama-g3"])
@pytest.mark.parametrize("mode", ["uniform", "adaptive"])
@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_selection_meets_the_parameter_ratio(arch, mode, ratio):
    """Counted on the shrunk model's tensors. Tolerance (whole units): adaptive within half of the
    largest unit; uniform within half a unit of each type per block."""
    model = tiny(arch, layers=3)
    before = prunable_params(model)
    layouts = [block_layout(b, model.config) for b in find_blocks(model)[1]]
    structures = flap(model, ratio, mode)
    removed = before - prunable_params(model)
    assert removed == sum(s.removed_params for s in structures)
    if mode == "adaptive":
        tolerance = max(layouts[0].attention.params_per_unit, layouts[0].mlp.params_per_unit) / 2
    else:
        tolerance = sum((lay.attention.params_per_unit + lay.mlp.params_per_unit) / 2 for lay in layouts)
    assert abs(removed - ratio * before) <= tolerance
    logits(model, ids())  # the shrunk model runs


def test_single_kv_group_cannot_be_pruned():
    scores = [UnitScores(torch.tensor([0.0]), torch.randn(8), 100, 3)] * 2
    with pytest.raises(EbftError, match="single KV group"):
        select_structure(scores, 0.2)
    with pytest.raises(ConfigError, match="sparsity"):
        select_structure(scores, 1.0)


# --- saving -------------------------------------------------------------------------------------

def _roundtrip(model, tmp_path):
    x = ids(seed=5)
    expected = logits(model, x)
    shape = make_saveable_(model)
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-5)  # padding is exact
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=1e-5)
    return shape, loaded


@pytest.mark.parametrize("arch, compensate", [
    ("llama", True), ("llama-g3", True), ("opt", True), ("qwen2", False), ("mistral", False),
    ("qwen3", False), ("gemma2", False), ("gemma3", False), ("phi3", False),
])
def test_uniform_saves_as_a_plain_config_of_the_family(arch, compensate, tmp_path):
    model = tiny(arch)
    dense = block_layout(find_blocks(model)[1][0], model.config)
    flap(model, 0.3, "uniform", compensate)  # round(0.3 * 2) = 1 of 2 KV groups, or 1 of OPT's 4 heads
    layout = block_layout(find_blocks(model)[1][0], model.config)
    assert layout.num_kv_heads == dense.num_kv_heads - 1
    shape, loaded = _roundtrip(model, tmp_path)
    cfg = loaded.config
    if arch == "opt":  # OPT derives head_dim from hidden_size / heads: heads are padded back
        assert cfg.num_attention_heads == 4 and cfg.ffn_dim == layout.intermediate_size
        assert shape.padding_params == 2 * dense.attention.params_per_unit  # one zero head per block
    else:
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == \
            (layout.num_heads, layout.num_kv_heads, layout.intermediate_size)
        assert cfg.head_dim == layout.head_dim
    if arch.startswith("llama"):  # o_proj/down_proj biases need both flags; q/k/v, gate/up get zero biases
        assert cfg.attention_bias and cfg.mlp_bias
        blk = loaded.model.layers[0]
        assert blk.self_attn.q_proj.bias.abs().sum() == 0 and blk.mlp.down_proj.bias.abs().sum() > 0
        zero_biases = (layout.num_heads + 2 * layout.num_kv_heads) * layout.head_dim + 2 * layout.intermediate_size
        assert shape.padding_params == 2 * zero_biases


def test_adaptive_pads_blocks_to_the_largest_and_reports_the_cost(tmp_path):
    model = tiny("llama", layers=3)
    flap(model, 0.3, "adaptive")
    layouts = [block_layout(b, model.config) for b in find_blocks(model)[1]]
    assert len({(lay.num_kv_heads, lay.intermediate_size) for lay in layouts}) > 1  # blocks really differ
    kv, width = max(lay.num_kv_heads for lay in layouts), max(lay.intermediate_size for lay in layouts)
    in_memory = sum(p.numel() for p in model.parameters())
    shape, loaded = _roundtrip(model, tmp_path)
    assert (loaded.config.num_key_value_heads, loaded.config.intermediate_size) == (kv, width)
    assert shape.params_in_memory == in_memory
    assert shape.params_saved == sum(p.numel() for p in loaded.parameters()) > in_memory
    pad = sum((kv - lay.num_kv_heads) * lay.attention.params_per_unit
              + (width - lay.intermediate_size) * lay.mlp.params_per_unit for lay in layouts)
    assert shape.padding_params >= pad


def test_head_count_the_family_refuses_is_padded_to_one_it_accepts(tmp_path):
    """Llama requires hidden_size % num_attention_heads == 0: 3 heads of 16 in 64 pad back to 4."""
    model = tiny("llama-mha")
    for block in find_blocks(model)[1]:
        shrink_block_(block, model.config, structure(block_layout(block, model.config), drop_groups=(2,)))
    assert save_shape(model).num_heads == 4
    shape, loaded = _roundtrip(model, tmp_path)
    assert loaded.config.num_attention_heads == 4


def test_family_without_a_bias_flag_says_so():
    model = tiny("mistral")
    flap(model, 0.3, "uniform", compensate=True)
    with pytest.raises(EbftError, match="--no-bias-compensation"):
        save_shape(model)


def test_save_shape_changes_nothing():
    model = tiny("llama", layers=3)
    flap(model, 0.3, "adaptive")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    heads = model.config.num_attention_heads
    save_shape(model)
    assert model.config.num_attention_heads == heads
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in after.items())


def test_adaptive_warns_when_the_target_is_out_of_reach(caplog):
    scores = [UnitScores(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]), 10, 1)]
    with caplog.at_level(logging.WARNING, logger="ebft.structured.flap"):
        out = select_structure(scores, 0.9)
    assert out[0].attention_keep == (1,) and out[0].mlp_keep == (1,) and "reachable" in caplog.text
