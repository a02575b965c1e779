"""Domino head math: the sequential rollout and the teacher-forced training head vs a naive reference.

The reference below is a direct, slow transcription of doc §1.4 steps 1-5, written in *block-slot*
terms (full block of S slots, shift_label decides which slot predicts which token) with its own
`torch.nn.GRU` stepped one token at a time and the concatenate-then-Linear MLP. It shares no code
with `domino_backend.head`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import domino_backend.head as head_mod
from domino_backend.draft_model import DraftModel
from domino_backend.head import rollout, teacher_forced_logits
from domino_backend.sampling import SamplingParams, probs_from_logits
from kernels.reference import gru_cell
from tiny import head_test_draft

H, V, G, E, S = 16, 40, 6, 7, 8  # hidden, vocab, GRU width, MLP bottleneck, block size
GREEDY = SamplingParams()


def make_model(shift_label: bool = True, prefix: int = 1, projector: str | None = "domino", seed: int = 0) -> DraftModel:
    return head_test_draft(V, S, G, E, 1, [1, 2], shift_label, prefix, projector, seed)


def make_embed(seed: int = 0) -> nn.Embedding:
    torch.manual_seed(1000 + seed)
    return nn.Embedding(V, H).requires_grad_(False)


def make_block(batch: int, seed: int):
    """Random slot hiddens z [B, S, H], base logits [B, S, V] over the whole block, anchor ids [B]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, S, H, generator=g)
    base = 2.0 * torch.randn(batch, S, V, generator=g)
    anchor = torch.randint(0, V, (batch,), generator=g)
    return z, base, anchor


# ---------------------------------------------------------------------------------------------
# Naive reference (doc §1.4)


def reference_rollout(model: DraftModel, z_block, base_block, anchor, embed, forced=None):
    """Returns (tokens [B, K], logits [B, K, V]) for the K draft tokens of one block.

    Slot semantics (doc §1.3): with shift_label slot k predicts the token at anchor+k+1 (all S slots
    draft); without it slot 0 is the anchor itself and slot k predicts anchor+k (S-1 drafts).
    `forced` [B, K]: realized tokens to feed instead of the argmax (teacher forcing / replay).
    """
    cfg = model.cfg
    batch = anchor.shape[0]
    gru = nn.GRU(H, G, num_layers=1, batch_first=True, bias=False)
    mlp_in = nn.Linear(H + G, E, bias=False)
    mlp_out = nn.Linear(E, V, bias=False)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(model.state_dict()["prefix_gru.weight_ih_l0"])
        gru.weight_hh_l0.copy_(model.state_dict()["prefix_gru.weight_hh_l0"])
        mlp_in.weight.copy_(model.state_dict()["embed_proj.0.weight"])
        mlp_out.weight.copy_(model.state_dict()["embed_proj.2.weight"])

    first_slot = 0 if cfg.shift_label else 1  # the slot that predicts anchor+1
    n_pure = cfg.pure_draft_prefix_len
    tokens, logits_all = [], []

    def realize(logits):
        j = len(tokens)
        tok = forced[:, j] if forced is not None else logits.argmax(-1)
        tokens.append(tok)
        logits_all.append(logits)
        return tok

    with torch.no_grad():
        # Steps 1-2: the first P drafts take the base logits only.
        for slot in range(first_slot, first_slot + n_pure):
            realize(base_block[:, slot])
        # Step 3: prime the GRU from a zero state on [anchor, d_1 .. d_P], one token per call.
        state, consumed = torch.zeros(1, batch, G), 0
        for tok in [anchor] + tokens[:n_pure]:
            _, state = gru(embed(tok)[:, None, :], state)
            consumed += 1
        # Step 4: every later slot is corrected; step the GRU on the realized token, except after the last.
        for slot in range(first_slot + n_pure, S):
            # Step 5: predicting anchor+j+1 (j = drafts so far), the state has consumed anchor .. anchor+j.
            assert consumed == len(tokens) + 1
            delta = mlp_out(torch.nn.functional.silu(mlp_in(torch.cat([z_block[:, slot], state[0]], dim=-1))))
            tok = realize(base_block[:, slot] + delta)
            if slot < S - 1:
                _, state = gru(embed(tok)[:, None, :], state)
                consumed += 1
    return torch.stack(tokens, 1), torch.stack(logits_all, 1)


def draft_slots(model: DraftModel, t: torch.Tensor) -> torch.Tensor:
    """Restrict a full-block tensor to the draft slots the engine hands to `rollout`."""
    return t[:, model.cfg.slot_offset:]


# ---------------------------------------------------------------------------------------------
# Greedy parity with the reference


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("shift_label", [True, False])
def test_greedy_rollout_matches_reference_token_for_token(shift_label, prefix, batch):
    model = make_model(shift_label, prefix)
    embed = make_embed()
    changed = state_sensitive = total = 0
    for seed in range(25):
        z, base, anchor = make_block(batch, seed)
        ref_tokens, ref_logits = reference_rollout(model, z, base, anchor, embed)
        tokens, probs = rollout(model, draft_slots(model, z), draft_slots(model, base), anchor, embed, GREEDY)
        assert probs is None
        assert tokens.shape == (batch, model.cfg.num_drafts) == ref_tokens.shape
        assert tokens.dtype == torch.long
        assert torch.equal(tokens, ref_tokens), f"seed {seed}"
        # The head must matter for this test to mean anything: count corrected drafts that differ
        # from the base argmax.
        plain = draft_slots(model, base).argmax(-1)
        assert torch.equal(tokens[:, :prefix], plain[:, :prefix])  # pure-draft prefix is base-only
        changed += int((tokens[:, prefix:] != plain[:, prefix:]).sum())
        other_anchor, _ = reference_rollout(model, z, base, (anchor + 1) % V, embed)
        state_sensitive += int((other_anchor[:, prefix:] != ref_tokens[:, prefix:]).sum())
        total += tokens[:, prefix:].numel()
    assert changed / total > 0.5  # the correction changes most tokens
    assert state_sensitive / total > 0.2  # and depends on what the GRU consumed


def test_num_drafts_and_suffix_start_follow_shift_label():
    assert (make_model(True, 1).cfg.num_drafts, make_model(True, 1).cfg.suffix_start) == (S, 1)
    assert (make_model(False, 1).cfg.num_drafts, make_model(False, 1).cfg.suffix_start) == (S - 1, 2)
    assert make_model(True, 2).cfg.suffix_start == 2 and make_model(False, 2).cfg.suffix_start == 3


def test_rollout_depends_on_the_anchor_and_previous_drafts():
    model, embed = make_model(), make_embed()
    differs = 0
    for seed in range(10):
        z, base, anchor = make_block(1, seed)
        a, _ = rollout(model, z, base, anchor, embed, GREEDY)
        b, _ = rollout(model, z, base, (anchor + 1) % V, embed, GREEDY)
        differs += int(not torch.equal(a, b))
        assert torch.equal(a[:, 0], b[:, 0])  # the base-only draft ignores the anchor
    assert differs >= 5


@pytest.mark.parametrize("prefix", [1, 2])
def test_rollout_takes_one_gru_step_per_consumed_token_and_none_after_the_last(prefix, monkeypatch):
    model, embed = make_model(prefix=prefix), make_embed()
    calls = []
    step = model.head_gru_step
    monkeypatch.setattr(model, "head_gru_step", lambda x, h: calls.append(1) or step(x, h))
    z, base, anchor = make_block(2, 0)
    rollout(model, z, base, anchor, embed, GREEDY)
    # Prime on anchor + P drafts, then one step per corrected draft except the last: K steps in all.
    assert len(calls) == (prefix + 1) + (S - prefix - 1) == S


def test_rollout_rows_are_independent_of_the_batch():
    model, embed = make_model(), make_embed()
    z, base, anchor = make_block(3, 7)
    together, _ = rollout(model, z, base, anchor, embed, GREEDY)
    for i in range(3):
        alone, _ = rollout(model, z[i : i + 1], base[i : i + 1], anchor[i : i + 1], embed, GREEDY)
        assert torch.equal(alone[0], together[i])


# ---------------------------------------------------------------------------------------------
# Sampled rollout


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3), SamplingParams(temperature=0.9, top_k=6, top_p=0.8)],
    ids=["T0.7", "T1.3", "T0.9-topk-topp"],
)
@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("shift_label", [True, False])
def test_sampled_rollout_returns_the_distributions_it_drew_from(shift_label, prefix, params):
    model, embed = make_model(shift_label, prefix), make_embed()
    for seed in range(6):
        z, base, anchor = make_block(3, seed)
        zd, bd = draft_slots(model, z), draft_slots(model, base)
        tokens, probs = rollout(model, zd, bd, anchor, embed, params, torch.Generator().manual_seed(seed))
        again, _ = rollout(model, zd, bd, anchor, embed, params, torch.Generator().manual_seed(seed))
        assert torch.equal(tokens, again)  # reproducible with the same generator seed
        assert probs.shape == (3, model.cfg.num_drafts, V) and probs.dtype == torch.float32
        # Replay the realized tokens through the reference: each position's distribution must be
        # softmax((base + delta) / T) (after top-k/top-p) given the previously drafted tokens.
        _, ref_logits = reference_rollout(model, z, base, anchor, embed, forced=tokens)
        if params.top_k == 0 and params.top_p == 1.0:
            expected = torch.softmax(ref_logits / params.temperature, dim=-1)
        else:
            expected = probs_from_logits(ref_logits, params)
        torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
        assert torch.all(probs.gather(-1, tokens[..., None]) > 0)  # every draft was possible


def test_sampled_rollout_distribution_matches_reference_probabilities():
    """Empirical check of the first corrected draft: frequencies follow the reference softmax."""
    model, embed = make_model(), make_embed()
    z, base, anchor = make_block(1, 3)
    base = base / 4  # flatter base: several tokens with real mass
    params = SamplingParams(temperature=1.0)
    n = 4000
    zr, br, ar = z.expand(n, -1, -1), base.expand(n, -1, -1), anchor.expand(n)
    tokens, probs = rollout(model, zr, br, ar, embed, params, torch.Generator().manual_seed(0))
    # Position 0 (base-only) must be distributed as softmax(base_0).
    freq0 = torch.bincount(tokens[:, 0], minlength=V).float() / n
    assert (freq0 - torch.softmax(base[0, 0], -1)).abs().max() < 0.03
    # Position 1 given d_0 = t: distribution is the reference's softmax at that prefix.
    t = int(freq0.argmax())
    rows = tokens[:, 0] == t
    forced = torch.full((1, model.cfg.num_drafts), t)
    _, ref_logits = reference_rollout(model, z, base, anchor, embed, forced=forced)
    freq1 = torch.bincount(tokens[rows, 1], minlength=V).float() / rows.sum()
    assert (freq1 - torch.softmax(ref_logits[0, 1], -1)).abs().max() < 0.06


# ---------------------------------------------------------------------------------------------
# Teacher forcing vs the sequential rollout


def _rollout_fed(model, z, base, anchor, embed, labels, monkeypatch):
    """Run head.rollout with its token choice replaced by `labels`; return the logits it produced."""
    seen: list[torch.Tensor] = []

    def forced_select(logits, params, generator):
        j = sum(x.shape[1] if x.dim() == 3 else 1 for x in seen)
        seen.append(logits)
        width = logits.shape[1] if logits.dim() == 3 else None
        return (labels[:, j : j + width] if width else labels[:, j]), None

    monkeypatch.setattr(head_mod, "select", forced_select)
    tokens, _ = rollout(model, z, base, anchor, embed, GREEDY)
    monkeypatch.undo()
    assert torch.equal(tokens, labels)
    parts = [x if x.dim() == 3 else x[:, None] for x in seen]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("prefix", [1, 2])
@pytest.mark.parametrize("shift_label", [True, False])
def test_teacher_forced_logits_equal_sequential_rollout_on_the_same_tokens(shift_label, prefix, monkeypatch):
    model, embed = make_model(shift_label, prefix), make_embed()
    n_blocks, k = 4, model.cfg.num_drafts
    for seed in range(5):
        z, base, anchor = make_block(n_blocks, seed)
        labels = torch.randint(0, V, (n_blocks, k), generator=torch.Generator().manual_seed(100 + seed))
        zd, bd = draft_slots(model, z), draft_slots(model, base)
        tf = teacher_forced_logits(model, zd, bd, anchor, labels, embed)
        assert tf.shape == (n_blocks, k, V)
        # 1) head.rollout itself, fed the labels as its realized tokens.
        seq = _rollout_fed(model, zd, bd, anchor, embed, labels, monkeypatch)
        torch.testing.assert_close(tf, seq, atol=1e-5, rtol=1e-5)
        # 2) the naive reference (nn.GRU stepped per token), fed the same labels.
        _, ref = reference_rollout(model, z, base, anchor, embed, forced=labels)
        torch.testing.assert_close(tf, ref, atol=1e-5, rtol=1e-5)
        # Pure-draft positions are the base logits, untouched; corrected ones are not.
        assert torch.equal(tf[:, :prefix], bd[:, :prefix])
        assert not torch.allclose(tf[:, prefix:], bd[:, prefix:])


@pytest.mark.parametrize("shift_label", [True, False])
def test_teacher_forcing_on_greedy_drafts_reproduces_them(shift_label):
    model, embed = make_model(shift_label), make_embed()
    for seed in range(5):
        z, base, anchor = make_block(3, seed)
        zd, bd = draft_slots(model, z), draft_slots(model, base)
        tokens, _ = rollout(model, zd, bd, anchor, embed, GREEDY)
        tf = teacher_forced_logits(model, zd, bd, anchor, tokens, embed)
        assert torch.equal(tf.argmax(-1), tokens)


def test_teacher_forced_logits_carry_gradients_to_the_head():
    model, embed = make_model(), make_embed()
    model.requires_grad_(True)
    z, base, anchor = make_block(2, 0)
    labels = torch.randint(0, V, (2, S))
    loss = teacher_forced_logits(model, z, base, anchor, labels, embed).logsumexp(-1).sum()
    loss.backward()
    for p in (model.prefix_gru.weight_ih_l0, model.prefix_gru.weight_hh_l0, model.embed_proj[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# GRU cell


@pytest.mark.parametrize("batch", [1, 5])
def test_gru_cell_equals_torch_gru_one_step(batch):
    torch.manual_seed(batch)
    gru = nn.GRU(H, G, num_layers=1, batch_first=True, bias=False)
    x, h = torch.randn(batch, H), torch.randn(batch, G)
    out, h_next = gru(x[:, None], h[None])
    mine = gru_cell(x, h, gru.weight_ih_l0, gru.weight_hh_l0)
    torch.testing.assert_close(mine, h_next[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mine, out[:, 0], atol=1e-6, rtol=1e-6)


def test_gru_cell_unrolled_equals_torch_gru_over_a_sequence():
    torch.manual_seed(0)
    gru = nn.GRU(H, G, num_layers=1, batch_first=True, bias=False)
    xs = torch.randn(3, 9, H)
    out, _ = gru(xs)
    h = torch.zeros(3, G)
    for t in range(9):
        h = gru_cell(xs[:, t], h, gru.weight_ih_l0, gru.weight_hh_l0)
        torch.testing.assert_close(h, out[:, t], atol=1e-6, rtol=1e-6)


def test_model_gru_step_uses_the_checkpoint_gru_weights():
    model = make_model()
    x, h = torch.randn(2, H), torch.randn(2, G)
    _, h_next = model.prefix_gru(x[:, None], h[None])
    torch.testing.assert_close(model.head_gru_step(x, h), h_next[0], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Without the head


@pytest.mark.parametrize("shift_label", [True, False])
def test_rollout_without_head_is_argmax_of_base(shift_label):
    model, embed = make_model(shift_label), make_embed()
    plain = make_model(shift_label, projector=None)
    assert not plain.has_head
    for seed in range(5):
        z, base, anchor = make_block(3, seed)
        zd, bd = draft_slots(model, z), draft_slots(model, base)
        with_head, _ = rollout(model, zd, bd, anchor, embed, GREEDY)
        off, probs = rollout(model, zd, bd, anchor, embed, GREEDY, use_head=False)
        assert probs is None
        assert torch.equal(off, bd.argmax(-1))
        no_head, _ = rollout(plain, zd, bd, anchor, embed, GREEDY)
        assert torch.equal(no_head, bd.argmax(-1))
        assert not torch.equal(with_head, off)  # the head does change these blocks


def test_sampled_rollout_without_head_uses_base_softmax():
    model, embed = make_model(), make_embed()
    z, base, anchor = make_block(2, 0)
    params = SamplingParams(temperature=0.8)
    tokens, probs = rollout(model, z, base, anchor, embed, params, torch.Generator().manual_seed(0), use_head=False)
    torch.testing.assert_close(probs, torch.softmax(base / 0.8, -1), atol=1e-6, rtol=1e-5)
    assert tokens.shape == (2, S)


def test_rollout_with_only_pure_prefix_slots_uses_base():
    model, embed = make_model(prefix=1), make_embed()
    z, base, anchor = make_block(2, 0)
    tokens, _ = rollout(model, z[:, :1], base[:, :1], anchor, embed, GREEDY)
    assert torch.equal(tokens, base[:, :1].argmax(-1))
