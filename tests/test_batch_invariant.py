"""Verify reproduces plain decoding bit for bit: the property greedy losslessness rests on."""

import pytest
import torch
import torch.nn.functional as F

from domino_backend.batch_invariant import BLOCK, MAX_ROWS, attend, prefill_blocks, tree_mask, visible_rows
from domino_backend.cpu import cpu_has_fast_bf16
from domino_backend.engine import Engine
from domino_backend.models import load_target
from domino_backend.target import Target
from kernels import attention

from tiny import tiny_target


def _decode_vs_verify(t: Target, prompt: torch.Tensor, block: torch.Tensor, reject: int = 3):
    """Logits and layer features of `block` decoded one token at a time, and verified in one pass
    (after a rejected draft was rolled back, as in the engine)."""
    layers = [0, t.num_layers // 2, t.num_layers - 1]
    one, many = t.session(), t.session()
    one.forward(prompt, keep_last=1)
    many.forward(prompt, keep_last=1)
    many.forward(block[:reject], layer_ids=layers)  # a verify whose drafts all fail ...
    many.rollback(len(prompt))  # ... is undone
    steps = [one.forward(block[i:i + 1], layer_ids=layers) for i in range(len(block))]
    whole = many.forward(block, layer_ids=layers)
    return torch.cat([s.logits for s in steps]), whole.logits, torch.cat([s.feats for s in steps]), whole.feats


# bf16 is what `--dtype auto` picks on CPUs with native bf16 (and only there is it packed).
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="the engine runs bf16 only on CPUs with native bf16"))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("k", [1, 8, 16])
# 16: bf16 attention runs the CPU kernel where it builds; 32: its AMX tile path too, where the CPU has it
@pytest.mark.parametrize("head_dim", [8, 16, 32])
def test_verify_logits_equal_decoding_bitwise(family, k, dtype, head_dim):
    t = tiny_target(family, vocab=96, seed=3, head_dim=head_dim)
    t.model.to(dtype)
    Engine(t)
    g = torch.Generator().manual_seed(k)
    prompt, block = torch.randint(0, 96, (23,), generator=g), torch.randint(0, 96, (k + 1,), generator=g)
    step_logits, block_logits, step_feats, block_feats = _decode_vs_verify(t, prompt, block)
    assert torch.equal(step_logits, block_logits)
    assert torch.equal(step_feats, block_feats)  # the drafter's conditioning is the same too


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_verify_logits_equal_decoding_bitwise_on_the_default_target(dtype):
    model, tok = load_target("coder", dtype=dtype)
    t = Target(model, tok)
    Engine(t)
    ids = tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
                     "        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n")
    prompt, block = torch.tensor(ids[:-9]), torch.tensor(ids[-9:])
    step_logits, block_logits, step_feats, block_feats = _decode_vs_verify(t, prompt, block)
    assert torch.equal(step_logits, block_logits) and torch.equal(step_feats, block_feats)
    _check_tree_verify_equals_branch_decoding(t, prompt, torch.tensor(ids[-10:]))  # draft trees too


def _attn_inputs(h=4, kv=2, m=5, n_keys=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, h, d, generator=g), torch.randn(kv, n_keys, d, generator=g),
            torch.randn(kv, n_keys, d, generator=g))


def _reference(q, k, v, mask):
    rep = q.shape[1] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0)[None], v.repeat_interleave(rep, 0)[None]
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, scale=0.3)[0].transpose(0, 1)


@pytest.mark.parametrize("m", [1, 5, MAX_ROWS + 3])
def test_rowwise_attention_is_causal_attention_over_the_cache(m):
    q, k, v = _attn_inputs(m=m, n_keys=m + 7)
    causal = torch.ones(m, m + 7, dtype=torch.bool).tril(7)
    out = attend(q, k, v, 7, visible_rows(None, m), scale=0.3)
    torch.testing.assert_close(out, _reference(q, k, v, causal))


def test_prefill_attention_runs_its_aligned_blocks_fused_and_is_causal_attention():
    past, m = 20, 3 * BLOCK + 5  # positions 20..120: blocks 0..31 (begun before the pass), 32, 64, 96 (cut short)
    assert prefill_blocks(past, m) == [0, 32 - past, 64 - past, 96 - past] and prefill_blocks(0, BLOCK - 1) == [0]
    assert prefill_blocks(past, 5) == [0] and prefill_blocks(64, 0) == []
    q, k, v = _attn_inputs(m=m, n_keys=m + past)
    causal = torch.ones(m, m + past, dtype=torch.bool).tril(past)
    out = attend(q, k, v, past, visible_rows(None, m), scale=0.3, blocks=prefill_blocks(past, m))
    torch.testing.assert_close(out, _reference(q, k, v, causal))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_prefill_pass_starting_inside_a_block_gives_its_rows_a_fresh_prefills_bits(dtype):
    """A prefix restored mid-block: the pass's rows equal, bit for bit, the same rows of a prefill
    from position 0, whatever the rows before the pass held in their query slots."""
    g = torch.Generator().manual_seed(5)
    m = 3 * BLOCK + 11
    q = torch.randn(m, 14, 64, generator=g).to(dtype)
    k, v = (torch.randn(2, m, 64, generator=g).to(dtype) for _ in range(2))
    fresh = attend(q, k, v, 0, None, scale=0.125, blocks=prefill_blocks(0, m))
    for start in (1, 7, BLOCK - 1, BLOCK, BLOCK + 20, 3 * BLOCK + 3, m - 1):
        part = attend(q[start:], k, v, start, None, scale=0.125, blocks=prefill_blocks(start, m - start))
        assert torch.equal(part, fresh[start:]), start


def test_rowwise_attention_runs_a_draft_tree_mask_as_masked_attention():
    parents = [0, 0, 1, 1, 2, 3]  # root 0; 1 and 2 its children; ...
    block = tree_mask(parents)
    m, past = block.shape[0], 5
    mask = torch.cat([torch.ones(m, past, dtype=torch.bool), block], 1)
    q, k, v = _attn_inputs(m=m, n_keys=m + past)
    out = attend(q, k, v, past, visible_rows(parents, m), scale=0.3)
    torch.testing.assert_close(out, _reference(q, k, v, mask))


IMPLS = ["sdpa", pytest.param("kernel", marks=pytest.mark.skipif(
    attention.kernel() is None, reason="the attention kernel needs AVX512 and a C compiler")),
         pytest.param("kernel-amx", marks=pytest.mark.skipif(
             not attention.amx(), reason="the kernel's AMX-BF16 path needs a CPU with AMX"))]


def _bf16_attn_inputs(m, past, seed=0):
    """The default target's attention shape (14 query heads over 2 kv heads, head dim 64) in bf16,
    the keys/values a view of a larger cache as the engine passes them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(m, 14, 64, generator=g).bfloat16()
    cache = torch.randn(2, 2, past + m + 9, 64, generator=g).bfloat16()
    return q, cache[0][:, :past + m], cache[1][:, :past + m]


def _use(impl, monkeypatch):
    """sdpa: one SDPA call per row; kernel: the CPU kernel's AVX512 fp32 path; kernel-amx: its tiles."""
    if impl == "sdpa":
        monkeypatch.setattr(attention, "supports", lambda *a: False)
    monkeypatch.setattr(attention, "amx", lambda: impl == "kernel-amx")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [1, 9, MAX_ROWS + 3])
def test_bf16_rowwise_attention_is_causal_attention_over_the_cache(impl, m, monkeypatch):
    _use(impl, monkeypatch)
    past = 37
    q, k, v = _bf16_attn_inputs(m, past)
    causal = torch.ones(m, m + past, dtype=torch.bool).tril(past)
    out = attend(q, k, v, past, visible_rows(None, m), scale=0.125)
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().repeat_interleave(7, 0)[None],
                                         v.float().repeat_interleave(7, 0)[None], attn_mask=causal,
                                         scale=0.125)[0].transpose(0, 1)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("past", [29, 26, 1000])  # 26, 1000: a short branch's keys end a 16-key block before its row
def test_each_bf16_attention_row_has_the_bits_it_has_alone(impl, past, monkeypatch):
    """A verify row (chain or tree) equals the decoding step it stands for: the row alone, over the
    keys its branch would have cached, bit for bit."""
    _use(impl, monkeypatch)
    parents = [0, 0, 1, 1, 2, 3, 5, 5]
    m = len(parents) + 1
    q, k, v = _bf16_attn_inputs(m, past, seed=1)
    chain = attend(q, k, v, past, visible_rows(None, m), scale=0.125)
    tree = attend(q, k, v, past, visible_rows(parents, m), scale=0.125)
    block = tree_mask(parents)
    for i in range(m):
        alone = attend(q[i:i + 1], k[:, :past + i + 1], v[:, :past + i + 1], past + i, None, scale=0.125)
        assert torch.equal(alone[0], chain[i])
        branch = torch.cat([torch.arange(past), past + block[i].nonzero().flatten()])
        kb, vb = k[:, branch].contiguous(), v[:, branch].contiguous()
        n = branch.numel()
        alone = attend(q[i:i + 1], kb, vb, n - 1, None, scale=0.125)
        assert torch.equal(alone[0], tree[i])


def test_a_tree_too_large_to_verify_row_by_row_is_refused():
    with pytest.raises(ValueError, match="row by row"):
        visible_rows([0] * MAX_ROWS, MAX_ROWS + 1)


# A tree where most branches are not a prefix of the block (their keys are gathered), depths 1-4.
TREE = [0, 0, 0, 1, 2, 2, 4, 5, 7]


def _branch(parents: list[int], node: int) -> list[int]:
    """Tree rows from the root to `node`, root first."""
    path = [node]
    while path[-1]:
        path.append(parents[path[-1] - 1])
    return path[::-1]


def _check_tree_verify_equals_branch_decoding(t: Target, prompt: torch.Tensor, tree: torch.Tensor) -> None:
    """Every tree row's logits and features are those of decoding its branch token by token, and
    keeping one branch leaves the cache plain decoding would have (the next token agrees too)."""
    layers = [0, t.num_layers - 1]
    sess = t.session()
    sess.forward(prompt, keep_last=1)
    whole = sess.forward(tree, layer_ids=layers, parents=TREE)
    for node in range(len(TREE) + 1):
        one = t.session()
        one.forward(prompt, keep_last=1)
        for row in _branch(TREE, node):
            step = one.forward(tree[row:row + 1], layer_ids=layers)
        assert torch.equal(step.logits[0], whole.logits[node]), node
        assert torch.equal(step.feats[0], whole.feats[node]), node
    kept = _branch(TREE, 8)  # rows 0, 2, 5, 7, 8
    sess.keep_path(len(prompt), kept)
    assert sess.length == len(prompt) + len(kept)
    nxt = tree[:1]
    after_tree = sess.forward(nxt).logits
    plain = t.session()  # the prompt prefilled the same way, the branch decoded token by token
    plain.forward(prompt, keep_last=1)
    for row in kept:
        plain.forward(tree[row:row + 1])
    assert torch.equal(after_tree, plain.forward(nxt).logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
# head_dim 32 (the kernel's AMX path in bf16): the kept branch moves into positions 30.. of the
# packed cache's first 32-key block while the next pass starts in the second
@pytest.mark.parametrize("head_dim,prompt_len", [(8, 19), (32, 30)])
def test_tree_verify_rows_equal_decoding_each_branch_bitwise(family, dtype, head_dim, prompt_len):
    t = tiny_target(family, vocab=96, seed=4, head_dim=head_dim)
    t.model.to(dtype)
    Engine(t)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 96, (prompt_len,), generator=g)
    tree = torch.randint(0, 96, (len(TREE) + 1,), generator=g)
    _check_tree_verify_equals_branch_decoding(t, prompt, tree)


def test_a_session_made_in_inference_mode_grows_outside_it():
    """`Target.session` runs under inference mode; growing the cache later (here outside it) must
    not trip over tensors made there (the packed counts are a plain C array, not a tensor)."""
    t = tiny_target(head_dim=32)
    t.model.to(torch.bfloat16)
    Engine(t)
    s = t.session()
    s.reserve(300)
    assert s.keys[0].shape[1] >= 300 and s.length == 0
    out = s.forward(torch.arange(40), keep_last=1)
    assert out.logits.shape[0] == 1 and s.length == 40
