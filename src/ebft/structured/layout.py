"""Where a decoder block's removable units live: its KV groups and its MLP channels.

A *unit* is the smallest piece structured pruning removes whole:

- attention: one **KV group** — the k and v rows of one key/value head, the q rows of the g query
  heads that share it (grouped-query attention; g = 1 for plain multi-head attention) and the
  matching g·head_dim input columns of the output projection. Removing whole groups keeps
  g = heads / kv_heads, so the attention's ``num_key_value_groups`` stays valid;
- MLP: one **channel** — one row of each input projection (gate and up, or fc1) and the matching
  input column of the output projection (down_proj, fc2).

A unit is described by :class:`Section` s: "in linear L, unit u owns rows (or columns)
``offset + u·width … offset + (u+1)·width``". Unfused projections have one section each; a fused
``qkv_proj`` has three sections (q, k, v) in one linear and a fused ``gate_up_proj`` two.

Discovery uses names to tell q, k, v and o apart inside the attention module and to find the MLP's
output projection (down_proj, fc2; needed when the MLP width equals the hidden size, which pruning
can bring about); everything else comes from shapes: a block's KV head count is ``k rows /
head_dim`` and its query head count ``o columns / head_dim`` (so an already shrunk block is read
correctly), and the MLP's input projections are the linears that read the hidden size and write
the MLP width. A layout that does not fit (fused projections of unknown row order, norms over all
heads, mixtures of experts, Conv1D layers, heads that do not form whole groups) raises
:class:`~ebft.errors.EbftError` rather than guessing.

Families checked in the tests: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 (fused
``qkv_proj`` and ``gate_up_proj``), OPT.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ebft.errors import EbftError

ATTENTION = "attention"
MLP = "mlp"
KINDS = (ATTENTION, MLP)

# The last component of a linear's name inside the attention module, by role.
_Q_NAMES = {"q_proj", "q", "query", "wq", "q_lin"}
_K_NAMES = {"k_proj", "k", "key", "wk", "k_lin"}
_V_NAMES = {"v_proj", "v", "value", "wv", "v_lin"}
_O_NAMES = {"o_proj", "out_proj", "dense", "wo", "o", "c_proj", "out_lin"}
# The MLP's output projection; needed when the MLP width equals the hidden size (shapes alone
# cannot tell then, and pruning can make them equal).
_DOWN_NAMES = {"down_proj", "fc2", "dense_4h_to_h", "c_proj", "w2", "fc_out"}
# Fused projections whose row order is known and tested: [q | k | v] and [gate | up] halves.
# Other fused layouts (GPT-NeoX/Falcon ``query_key_value``, CodeGen's ``qkv_proj``) interleave
# heads differently, so a fused name alone is not enough: the family must be listed here.
_FUSED_QKV = {"phi3": "qkv_proj"}
_FUSED_GATE_UP = {"phi3": "gate_up_proj"}
_FUSED_NAMES = {"qkv_proj", "query_key_value", "c_attn", "wqkv", "qkv", "gate_up_proj", "w13", "c_fc"}


@dataclass(frozen=True)
class Section:
    """Unit ``u`` owns rows (or columns) ``offset + u*width`` up to ``offset + (u+1)*width`` of ``linear``."""

    linear: str  # the linear's name relative to the block
    offset: int
    width: int

    def span(self, unit: int) -> range:
        start = self.offset + unit * self.width
        return range(start, start + self.width)


@dataclass(frozen=True)
class Units:
    """The removable units of one module type in one block, as the block is now."""

    kind: str  # ATTENTION or MLP
    count: int  # KV groups, or MLP channels
    rows: tuple[Section, ...]  # output rows of the input-side projections (q, k, v / gate, up, fc1)
    cols: Section  # input columns of the output projection (o_proj / down_proj, fc2)
    params_per_unit: int  # weights and input-side bias entries one unit removes
    module: str  # the attention module, or the module holding the MLP ('' when it is the block)

    @property
    def out_proj(self) -> str:
        """The output projection: FLAP's statistics are those of its inputs."""
        return self.cols.linear


@dataclass(frozen=True)
class BlockLayout:
    attention: Units
    mlp: Units
    hidden_size: int
    head_dim: int
    group_size: int  # query heads per KV head (g)
    fused_qkv: bool

    @property
    def num_heads(self) -> int:
        return self.attention.count * self.group_size

    @property
    def num_kv_heads(self) -> int:
        return self.attention.count

    @property
    def intermediate_size(self) -> int:
        return self.mlp.count

    def units(self, kind: str) -> Units:
        return self.attention if kind == ATTENTION else self.mlp


def hidden_size_of(config) -> int:
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise EbftError(f"{type(config).__name__} names no hidden size (hidden_size, d_model, n_embd)")


def block_layout(block: nn.Module, config) -> BlockLayout:
    """Discover the units of one decoder block. ``config`` is the model's config (for the hidden
    size, the family name and the head_dim when the attention module does not store it)."""
    hidden = hidden_size_of(config)
    family = getattr(config, "model_type", type(config).__name__)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise EbftError(f"structured pruning needs nn.Linear projections; a {family} block has none "
                        "(GPT-2's Conv1D layers are not supported)")
    attn_name, attn = _attention_module(block, linears, family)
    in_attn = {n: m for n, m in linears.items() if n.startswith(attn_name + ".")}
    attention, head_dim, group_size, fused = _attention_units(attn_name, attn, in_attn, config, hidden, family)
    rest = {n: m for n, m in linears.items() if n not in in_attn}
    mlp = _mlp_units(block, rest, hidden, family)
    return BlockLayout(attention, mlp, hidden, head_dim, group_size, fused)


def _attention_module(block: nn.Module, linears: dict, family: str) -> tuple[str, nn.Module]:
    found = [(n, m) for n, m in block.named_modules()
             if n and ("attn" in n.rsplit(".", 1)[-1].lower() or "attention" in n.rsplit(".", 1)[-1].lower())
             and any(k.startswith(n + ".") for k in linears)]
    # The outermost match: a wrapper named "attention" may hold a submodule named "self_attn".
    outer = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    if len(outer) != 1:
        raise EbftError(f"structured pruning: found {len(outer)} attention modules in a {family} block "
                        f"({', '.join(n for n, _ in outer) or 'none'}); expected exactly one")
    return outer[0]


def _attention_units(attn_name, attn, linears, config, hidden, family):
    roles: dict[str, str] = {}
    for name, linear in linears.items():
        last = name.rsplit(".", 1)[-1]
        role = ("q" if last in _Q_NAMES else "k" if last in _K_NAMES else "v" if last in _V_NAMES
                else "o" if last in _O_NAMES else "qkv" if _FUSED_QKV.get(family) == last else None)
        if role is None:
            why = ("a fused q/k/v projection whose row order ebft does not know for this family"
                   if last.lower() in _FUSED_NAMES else "an attention linear ebft does not know")
            raise EbftError(f"structured pruning: {family} attention has {name!r}, {why}; "
                            "supported: separate q/k/v/o projections, or Phi-3's fused qkv_proj")
        if role in roles:
            raise EbftError(f"structured pruning: {family} attention has two {role} projections "
                            f"({roles[role]!r} and {name!r})")
        roles[role] = name
    fused = "qkv" in roles
    need = {"qkv", "o"} if fused else {"q", "k", "v", "o"}
    if set(roles) != need:
        raise EbftError(f"structured pruning: {family} attention has projections {sorted(roles)}, "
                        f"expected {sorted(need)}")
    o = linears[roles["o"]]
    if o.out_features != hidden:
        raise EbftError(f"structured pruning: {family} {roles['o']} writes {o.out_features} features, "
                        f"not the hidden size {hidden}")
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int):
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    heads, rem = divmod(o.in_features, head_dim)
    if fused:
        qkv = linears[roles["qkv"]]
        kv_rows = qkv.out_features - o.in_features
        kv_heads = kv_rows // (2 * head_dim) if kv_rows % (2 * head_dim) == 0 else 0
        q_rows, k_rows, v_rows = o.in_features, kv_heads * head_dim, kv_heads * head_dim
    else:
        q_rows, k_rows, v_rows = (linears[roles[r]].out_features for r in "qkv")
        kv_heads = k_rows // head_dim
    whole = (rem == 0 and q_rows == heads * head_dim and k_rows == v_rows == kv_heads * head_dim
             and kv_heads > 0 and heads % kv_heads == 0)
    if not whole:
        raise EbftError(f"structured pruning: {family} attention heads cannot be removed in whole KV groups "
                        f"(head_dim {head_dim}, q rows {q_rows}, k rows {k_rows}, v rows {v_rows}, "
                        f"o columns {o.in_features})")
    g = heads // kv_heads
    _refuse_head_shaped_params(attn_name, attn, set(linears), head_dim, {heads, kv_heads, q_rows, k_rows}, family)
    if fused:
        qkv_name = roles["qkv"]
        rows = (Section(qkv_name, 0, g * head_dim), Section(qkv_name, q_rows, head_dim),
                Section(qkv_name, q_rows + k_rows, head_dim))
    else:
        rows = (Section(roles["q"], 0, g * head_dim), Section(roles["k"], 0, head_dim),
                Section(roles["v"], 0, head_dim))
    cols = Section(roles["o"], 0, g * head_dim)
    params = _params_per_unit(rows, cols, linears)
    return Units(ATTENTION, kv_heads, rows, cols, params, attn_name), head_dim, g, fused


def _refuse_head_shaped_params(attn_name, attn, linear_names, head_dim, head_sizes, family):
    """Per-head-dim norms (Qwen3, Gemma 3) are fine; a parameter sized by the head count (OLMo 2's
    q_norm over all heads, Cohere's per-head norms) would silently break when heads go."""
    for name, p in attn.named_parameters():
        owner = f"{attn_name}.{name.rsplit('.', 1)[0]}" if "." in name else attn_name
        if owner in linear_names:
            continue
        if any(s in head_sizes and s != head_dim for s in p.shape) or p.numel() > head_dim:
            raise EbftError(f"structured pruning: {family} attention parameter {attn_name}.{name} of shape "
                            f"{tuple(p.shape)} depends on the head count; this layout is not supported")


def _mlp_units(block, linears, hidden, family):
    outs = {n: m for n, m in linears.items() if m.out_features == hidden and n.rsplit(".", 1)[-1] in _DOWN_NAMES}
    if not outs:
        outs = {n: m for n, m in linears.items() if m.out_features == hidden and m.in_features != hidden}
    if len(outs) != 1:
        raise EbftError(f"structured pruning: expected one MLP output projection in a {family} block, "
                        f"found {sorted(outs) or 'none'} among {sorted(linears)}")
    out_name, out = next(iter(outs.items()))
    width = out.in_features
    ins = {n: m for n, m in linears.items()
           if n != out_name and m.in_features == hidden and m.out_features == width}
    fused = {n: m for n, m in linears.items() if m.in_features == hidden and m.out_features == 2 * width
             and _FUSED_GATE_UP.get(family) == n.rsplit(".", 1)[-1]}
    unknown = set(linears) - {out_name} - set(ins) - set(fused)
    if unknown or len(ins) + 2 * len(fused) not in (1, 2) or (ins and fused):
        raise EbftError(f"structured pruning: unsupported {family} MLP (linears {sorted(linears)}); "
                        "supported: gate/up/down, fc1/fc2, or Phi-3's fused gate_up_proj")
    if fused:
        name = next(iter(fused))
        rows = (Section(name, 0, 1), Section(name, width, 1))
    else:
        rows = tuple(Section(n, 0, 1) for n in sorted(ins))
    cols = Section(out_name, 0, 1)
    module = _common_parent([s.linear for s in rows] + [out_name])
    if module:
        holder = block.get_submodule(module)
        own = {n for n in linears if n.startswith(module + ".")}
        for name, p in holder.named_parameters():
            if f"{module}.{name.rsplit('.', 1)[0]}" not in own and width in p.shape:
                raise EbftError(f"structured pruning: {family} MLP parameter {module}.{name} of shape "
                                f"{tuple(p.shape)} depends on the MLP width; this layout is not supported")
    return Units(MLP, width, rows, cols, _params_per_unit(rows, cols, linears), module)


def _params_per_unit(rows: tuple[Section, ...], cols: Section, linears: dict) -> int:
    total = sum(s.width * (linears[s.linear].in_features + (linears[s.linear].bias is not None)) for s in rows)
    return total + cols.width * linears[cols.linear].out_features


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
