"""Batched rounds stay lossless: each sequence's output is its own decoding's, bit for bit, whatever
else shares the target forward (methods, draft lengths, trees, prompt lengths, sampling seeds,
sequences that join late, finish, are cancelled or fail)."""

import pytest
import torch

from domino_backend.engine import Engine, GenerationRequest
from kernels import attention
from domino_backend.forward import Pass
from domino_backend.settings import EngineSettings
from test_batch_invariant import DTYPES, TREE
from tiny import tiny_draft, tiny_target

# Prompts of many lengths: one token, a few, and one with whole attention blocks (fused prefill rows).
PROMPTS = [[3, 5, 7, 9, 11], [1], [8, 8, 8, 8, 2, 8, 8], list(range(10, 50)), [4, 9, 4, 9, 4, 9, 4, 9, 4, 9, 4, 9, 4]]


def make_engine(family: str = "qwen3", **settings) -> Engine:
    target = tiny_target(family, peak=3.0, seed=7)
    settings.setdefault("prefill_chunk", 8)  # prompts take several chunks, which ride along others' rounds
    settings.setdefault("prefix_cache", 0)
    return Engine(target, tiny_draft(target, seed=1), EngineSettings(**settings))


def drive(engine: Engine, gens: list, join: dict[int, list] | None = None, each_round=None) -> int:
    """Advance every unfinished generation together, one `Engine.step` per round; `join` adds
    generations at a given round. Returns the number of rounds."""
    active, rnd = list(gens), 0
    while active or any(r >= rnd for r in (join or {})):
        active += (join or {}).pop(rnd, [])
        results = engine.step(active)
        assert len(results) == len(active)
        if each_round:
            each_round(rnd, active, results)
        active = [g for g in active if g.finish_reason is None]
        rnd += 1
    return rnd


def alone(engine: Engine, prompt, **kw) -> list[int]:
    return engine.generate(prompt, GenerationRequest(**kw)).token_ids


REQUESTS = [  # (prompt index, request): every method, fixed and adaptive K, chains and trees
    (0, dict(method="ar")),
    (1, dict(method="domino", adaptive_drafts=False)),
    (2, dict(method="ngram", adaptive_drafts=False, max_drafts=3)),
    (3, dict(method="domino+ngram")),
    (4, dict(method="domino", draft_tree=False, max_drafts=5)),
    (0, dict(method="dflash", adaptive_drafts=False)),
    (3, dict(method="domino", max_drafts=2)),
]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_every_sequence_in_a_mixed_batch_equals_its_plain_greedy_decoding(family):
    engine = make_engine(family)
    gens = [engine.stream(PROMPTS[i], GenerationRequest(max_new_tokens=30 + 3 * j, **kw))
            for j, (i, kw) in enumerate(REQUESTS)]
    widths = []
    drive(engine, gens, each_round=lambda r, active, res: widths.append(len(active)))
    assert max(widths) == len(REQUESTS)  # they really shared forwards
    for j, ((i, _), g) in enumerate(zip(REQUESTS, gens)):
        assert g.finish_reason == "length"
        assert g.token_ids == alone(engine, PROMPTS[i], max_new_tokens=30 + 3 * j, method="ar"), REQUESTS[j]
    assert sum(g.stats.accepted for g in gens) > 0  # drafts were accepted, so rollbacks happened mid-batch


def test_sequences_joining_mid_batch_prefill_alongside_the_others_rounds():
    engine = make_engine()
    first = [engine.stream(PROMPTS[3], GenerationRequest(max_new_tokens=40, method="domino"))]
    late = {2: [engine.stream(PROMPTS[0], GenerationRequest(max_new_tokens=20, method="ngram"))],
            5: [engine.stream(PROMPTS[3], GenerationRequest(max_new_tokens=25, method="ar")),
                engine.stream(PROMPTS[4], GenerationRequest(max_new_tokens=12, method="domino+ngram"))]}
    everyone = first + late[2] + late[5]
    drive(engine, first, dict(late))
    for g in everyone:
        assert g.token_ids == alone(engine, g.prompt_ids, max_new_tokens=g.req.max_new_tokens, method="ar")


@pytest.mark.parametrize("method", ["ar", "domino", "ngram"])
def test_a_seeded_sampled_request_draws_the_same_tokens_alone_and_batched(method):
    engine = make_engine()
    kw = dict(max_new_tokens=30, method=method, temperature=0.8, top_p=0.95, seed=11, adaptive_drafts=False)
    ref = alone(engine, PROMPTS[2], **kw)
    others = [engine.stream(PROMPTS[i], GenerationRequest(max_new_tokens=25, method=m, temperature=t, seed=i))
              for i, m, t in ((0, "domino", 0.0), (3, "ar", 1.0), (4, "domino+ngram", 0.0))]
    gen = engine.stream(PROMPTS[2], GenerationRequest(**kw))
    drive(engine, others + [gen])
    assert gen.token_ids == ref


def test_a_sequence_cancelled_or_finished_mid_batch_leaves_the_others_exact():
    engine = make_engine()
    short = engine.stream(PROMPTS[0], GenerationRequest(max_new_tokens=3, method="domino"))
    doomed = engine.stream(PROMPTS[3], GenerationRequest(max_new_tokens=60, method="domino+ngram"))
    rest = [engine.stream(PROMPTS[i], GenerationRequest(max_new_tokens=40, method=m))
            for i, m in ((2, "domino"), (4, "ngram"))]

    def cancel_at_6(rnd, active, results):
        if rnd == 6:
            doomed.cancel()

    drive(engine, [short, doomed] + rest, each_round=cancel_at_6)
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    assert doomed.finish_reason == "cancelled"
    full = alone(engine, PROMPTS[3], max_new_tokens=60, method="ar")
    assert 0 < len(doomed.token_ids) < 60 and doomed.token_ids == full[:len(doomed.token_ids)]
    for g in rest:
        assert g.token_ids == alone(engine, g.prompt_ids, max_new_tokens=40, method="ar")


def test_a_request_failing_mid_batch_ends_only_itself():
    engine = make_engine()
    gens = [engine.stream(PROMPTS[i], GenerationRequest(max_new_tokens=40, method=m))
            for i, m in ((0, "domino"), (2, "ar"), (3, "domino+ngram"), (4, "ngram"))]
    drafting, forward = gens[0], gens[2]
    seen = {}

    def break_two(rnd, active, results):
        seen.update({id(g): r for g, r in zip(active, results) if isinstance(r, Exception)})
        if rnd == 2:  # its proposer raises while drafting the next round
            drafting._rounds.proposer.propose = lambda *a: 1 / 0
            # and another one's rows break the shared forward (a token outside the vocabulary)
            plan = forward.plan
            forward.plan = lambda *a: Pass(**{**vars(plan(*a)), "ids": torch.tensor([10 ** 6])})

    drive(engine, gens, each_round=break_two)
    assert drafting.finish_reason == forward.finish_reason == "error"
    assert isinstance(seen[id(drafting)], ZeroDivisionError) and isinstance(seen[id(forward)], IndexError)
    for g in (gens[1], gens[3]):
        assert g.finish_reason == "length"
        assert g.token_ids == alone(engine, g.prompt_ids, max_new_tokens=40, method="ar")


@pytest.mark.parametrize("head_dim", [8, 32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_packed_forward_rows_equal_each_sequence_alone_bitwise(family, dtype, head_dim, monkeypatch):
    """The forward itself: logits and layer features of a prefill chunk, a verify chain and a draft
    tree packed together equal those of each pass run alone (bf16 at head_dim 32 on an AMX CPU:
    every sequence's attention in one kernel call per layer, `attention.attend_batch`)."""
    calls = []
    batch_call = attention.attend_batch
    monkeypatch.setattr(attention, "attend_batch", lambda c, scale: (calls.append(len(c)), batch_call(c, scale)))
    t = tiny_target(family, vocab=96, seed=5, head_dim=head_dim)
    t.model.to(dtype)
    Engine(t)
    g = torch.Generator().manual_seed(3)
    layers = [0, t.num_layers - 1]
    prompts = [torch.randint(0, 96, (n,), generator=g) for n in (11, 40, 6)]
    blocks = [torch.randint(0, 96, (n,), generator=g) for n in (45, 9, len(TREE) + 1)]
    parents = [None, None, TREE]

    def sessions():
        out = []
        for p in prompts:
            s = t.session()
            s.forward(p, keep_last=1)
            out.append(s)
        return out

    solo = [s.forward(b, layers, 0, par) for s, b, par in zip(sessions(), blocks, parents)]
    batch = sessions()
    together = t.forward_batch([Pass(s, b, layers, 0, par) for s, b, par in zip(batch, blocks, parents)])
    for a, b in zip(solo, together):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.feats, b.feats)
    assert [s.length for s in batch] == [len(p) + len(b) for p, b in zip(prompts, blocks)]
    batched = dtype == torch.bfloat16 and head_dim == 32 and attention.amx()
    assert (3 in calls) == batched  # the three passes' attention went in one call per layer


def test_prefill_chunks_beyond_the_forward_budget_wait_the_most_urgent_first():
    engine = make_engine(prefill_chunk=8, batch_rows=12)
    gens = [engine.stream(p, GenerationRequest(max_new_tokens=10, method=m))
            for p, m in ((PROMPTS[3], "domino"), (PROMPTS[3][3:], "ar"), (PROMPTS[0], "ngram"))]
    engine.step(gens)
    assert [g._rounds.prefilled for g in gens] == [8, 0, 0]  # one chunk fits; 8 + 8 and 8 + 5 do not
    engine.step(gens[::-1])  # the most urgent first: now the short prompt's whole chunk, then no room
    assert [g._rounds.prefilled for g in gens] == [8, 0, 5]
    drive(engine, gens)
    for g in gens:
        assert g.token_ids == alone(engine, g.prompt_ids, max_new_tokens=10, method="ar")


def test_prefill_chunks_are_cut_to_whole_blocks_to_fit_a_forward_and_keep_their_bits():
    engine = make_engine(prefill_chunk=64, batch_rows=96)
    prompts = [[(7 * i + k) % 60 for i in range(100 + k)] for k in range(3)]
    gens = [engine.stream(p, GenerationRequest(max_new_tokens=6, method="ar")) for p in prompts]
    engine.step(gens)
    assert [g._rounds.prefilled for g in gens] == [64, 32, 0]  # 64 + a block of 64 fit; no room after
    engine.step(gens[::-1], max_rows=8)  # a smaller forward: the most urgent one's chunk, a block of it
    assert [g._rounds.prefilled for g in gens] == [64, 32, 32]
    drive(engine, gens)
    for g in gens:
        assert g.token_ids == alone(engine, g.prompt_ids, max_new_tokens=6, method="ar")
        assert g.token_ids == alone(make_engine(prefill_chunk=512), g.prompt_ids, max_new_tokens=6, method="ar")


def test_requests_that_restore_a_cached_prefix_are_budgeted_by_the_rows_they_still_prefill():
    """Keystrokes in three files: each new prompt restores most of itself, so all three prefill
    in the same forward (budgeted by the chunk before the lookup, only one could go per forward)."""
    engine = make_engine(prefix_cache=3, prefill_chunk=64, batch_rows=48)
    files = [[(k * 7 + i) % 60 for i in range(70)] for k in range(3)]
    for f in files:
        engine.generate(f[:64] + [61] + f[64:68], GenerationRequest(max_new_tokens=2, method="ar"))
    gens = [engine.stream(f[:66] + [61] + f[66:70], GenerationRequest(max_new_tokens=4, method="ar")) for f in files]
    assert [g.prefill_rows() for g in gens] == [71 - 64] * 3  # 64 restored: whole attention blocks
    engine.step(gens)
    assert all(g.token_ids for g in gens)  # every prompt is in and has its first token
    for g in gens:
        assert g.stats.reused_tokens == 64
        assert g.token_ids[:1] == alone(engine, g.prompt_ids, max_new_tokens=1, method="ar")


def test_a_prompt_restored_mid_block_prefills_in_chunks_that_end_on_block_boundaries():
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 60, (250,), generator=g).tolist()
    engine = make_engine(prefill_chunk=64, prefix_cache=1)
    engine.generate(prompt[:100] + [61] * 60, GenerationRequest(max_new_tokens=1, method="ar"))
    gen = engine.stream(prompt, GenerationRequest(max_new_tokens=6, method="ar"))
    assert gen.prefill_rows() == 60 and gen.stats.reused_tokens == 100  # 100 .. 160: a chunk, block-aligned end
    assert gen.prefill_rows(30) == 28 and gen.prefill_rows(3) == 0  # cut at 128; no boundary before 103
    engine.step([gen], max_rows=30)
    assert gen._rounds.prefilled == 128
    drive(engine, [gen])
    assert gen.token_ids == alone(make_engine(prefill_chunk=512), prompt, max_new_tokens=6, method="ar")


def test_the_next_keystroke_replaces_its_file_in_the_prefix_cache():
    """Many clients typing in their own files: each keeps one snapshot, so none evicts another's."""
    engine = make_engine(prefix_cache=3, prefill_chunk=64)
    files = [[(k * 7 + i) % 60 for i in range(60)] for k in range(3)]
    for f in files:
        for cursor in (40, 41):  # the cursor moves on; the suffix after it shifts
            engine.generate(f[:cursor] + [61] + f[cursor:cursor + 10], GenerationRequest(max_new_tokens=2, method="ar"))
    g = engine.generate(files[0][:44] + [61] + files[0][44:54], GenerationRequest(max_new_tokens=2, method="ar"))
    assert g.stats.reused_tokens == 32  # 41 shared; their last block ends inside both prompts, at 52 and 55


def test_the_prefix_cache_keeps_within_its_memory_budget_dropping_the_least_recently_used():
    c = make_engine().target.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4  # fp32 keys and values
    files = [[(k * 7 + i) % 60 for i in range(60)] for k in range(4)]
    sizes = []
    for budget_files in (4, 2):
        engine = make_engine(prefill_chunk=64, prefix_cache=64)
        engine.prefix_cache.max_bytes = None
        engine.generate(files[0], GenerationRequest(max_new_tokens=1, method="ar"))
        one = engine.prefix_cache.nbytes
        assert one >= 60 * per_token  # the target's K/V at least (and the drafter's context)
        engine.prefix_cache.max_bytes = budget_files * one + one // 2
        for f in files[1:]:
            engine.generate(f, GenerationRequest(max_new_tokens=1, method="ar"))
        sizes.append(engine.prefix_cache.size)
        assert engine.prefix_cache.nbytes <= engine.prefix_cache.max_bytes
        again = engine.generate(files[0] + [61], GenerationRequest(max_new_tokens=1, method="ar"))
        assert (again.stats.reused_tokens > 0) == (budget_files == 4)  # the oldest went first
    assert sizes == [4, 2]
    engine.prefix_cache.max_bytes = one // 2  # a snapshot larger than the whole budget is not kept
    engine.prefix_cache.clear()
    engine.generate(files[1], GenerationRequest(max_new_tokens=1, method="ar"))
    assert engine.prefix_cache.size == 0


def test_a_restored_prefix_brings_the_drafters_context_so_drafts_match_a_fresh_prefill():
    g = torch.Generator().manual_seed(3)
    first = torch.randint(0, 60, (120,), generator=g).tolist()
    prompt = first[:100] + [61, 62] + first[100:110]
    req = GenerationRequest(max_new_tokens=24, method="domino", adaptive_drafts=False, draft_tree=False)
    fresh = make_engine(prefill_chunk=64).generate(prompt, req)
    cached = make_engine(prefill_chunk=64, prefix_cache=2)
    cached.generate(first, req)
    extended = []
    model = cached.draft
    extend = model.extend_contexts
    model.extend_contexts = lambda items: (extended.extend(f.shape[1] for f, _ in items), extend(items))
    again = cached.generate(prompt, req)
    assert again.stats.reused_tokens == 96
    assert sum(extended) == len(prompt) - 96 + again.stats.new_tokens - 1  # the prefix's context came along
    assert again.token_ids == fresh.token_ids and again.stats.accept_hist == fresh.stats.accept_hist


def _prefilled(engine: Engine, prompt: list[int]) -> tuple[list[torch.Tensor], int]:
    """The target's keys after the prompt's prefill, and the first token."""
    gen = engine.stream(prompt, GenerationRequest(max_new_tokens=5, method="ar"))
    while not gen.token_ids:
        engine.step([gen])
    sess = gen._rounds.sess
    return [k[:, :len(prompt)].clone() for k in sess.keys], gen.token_ids[0]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_prompt_prefills_to_the_same_bits_whatever_was_restored_or_how_it_was_chunked(family):
    """A restored prefix or another chunk size must not change a prompt's K/V by a bit, or the
    prefix cache would change outputs (int8 activations turn such bits into other tokens)."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 64, (150,), generator=g).tolist()
    want = _prefilled(make_engine(family, prefill_chunk=64), prompt)
    for chunk in (32, 128, 512):
        assert all(torch.equal(a, b) for a, b in zip(want[0], _prefilled(make_engine(family, prefill_chunk=chunk),
                                                                           prompt)[0]))
    # An earlier prompt of `shared` + `tail` tokens sharing `shared`, then the prompt itself (150):
    # whole blocks restore, and the rest of a block too where it ends at the same place in both.
    cases = [(100, 20, 96), (100, 60, 100), (149, 20, 128), (37, 20, 32), (37, 40, 37), (130, 30, 128), (141, 9, 141)]
    for chunk in (64, 32):
        cached = make_engine(family, prefill_chunk=chunk, prefix_cache=1)  # the earlier prompt only
        for shared, tail, restored in cases:
            other = (prompt[shared] + 1) % 64
            cached.generate(prompt[:shared] + [other] * tail, GenerationRequest(max_new_tokens=1, method="ar"))
            gen = cached.stream(prompt, GenerationRequest(max_new_tokens=5, method="ar"))
            gen.prefill_rows()
            assert gen.stats.reused_tokens == restored, (shared, tail)
            keys, first = _prefilled(cached, prompt)
            assert first == want[1] and all(torch.equal(a, b) for a, b in zip(want[0], keys)), (chunk, shared, tail)


def test_a_draft_cap_set_mid_generation_keeps_the_output_exact():
    engine = make_engine()
    gen = engine.stream(PROMPTS[2], GenerationRequest(max_new_tokens=40, method="domino", adaptive_drafts=False))
    drafted = []

    def cap_between(rnd, active, results):
        drafted.append(gen.stats.drafted)
        gen.cap_drafts(0 if 2 <= rnd < 6 else None)

    drive(engine, [gen], each_round=cap_between)
    assert drafted[3] == drafted[5] < drafted[7]  # capped rounds drafted nothing, later ones did again
    assert gen.token_ids == alone(engine, PROMPTS[2], max_new_tokens=40, method="ar")


def test_batched_requests_draft_what_they_draft_alone_with_one_context_pass_per_step():
    """The drafter's context rows of every request in a step are fused and projected in one pass
    (`DraftModel.flush_context`); each request's drafts stay the ones it drafts alone."""
    engine = make_engine()
    kws = [dict(method="domino"), dict(method="domino", draft_tree=False, max_drafts=5),
           dict(method="domino+ngram"), dict(method="dflash")]
    prompts = [PROMPTS[3], PROMPTS[0], PROMPTS[4], PROMPTS[2]]

    def streams() -> tuple[list, list[list]]:
        """Generations whose every verify pass's rows (anchor, then drafts) are recorded."""
        gens, rows = [], []
        for p, kw in zip(prompts, kws):
            g = engine.stream(p, GenerationRequest(max_new_tokens=30, adaptive_drafts=False, **kw))
            rows.append([])

            def plan(*a, plan=g.plan, log=rows[-1]):
                p = plan(*a)
                if p is not None:
                    log.append(p.ids.tolist())
                return p

            g.plan = plan
            gens.append(g)
        return gens, rows

    solo, solo_rows = streams()
    for g in solo:
        drive(engine, [g])
    passes = []
    extend = engine.draft.extend_contexts
    engine.draft.extend_contexts = lambda items: (passes.append(len(items)), extend(items))
    gens, rows = streams()
    drive(engine, gens)
    assert max(passes) == len(gens)  # one pass carried every request's rows
    assert rows == solo_rows and [g.token_ids for g in gens] == [g.token_ids for g in solo]
    assert sum(len(r) > 1 for log in rows for r in log) > 20  # rounds drafted (prefill chunks are in the logs too)


def test_a_drafter_context_that_fails_to_extend_ends_only_its_request():
    engine = make_engine()
    gens = [engine.stream(PROMPTS[i], GenerationRequest(max_new_tokens=30, method=m))
            for i, m in ((3, "domino"), (2, "domino+ngram"), (4, "ar"))]
    doomed = gens[0]._rounds.proposer.cache
    extend = engine.draft.extend_contexts

    def extend_unless_doomed(items):
        if any(cache is doomed for _, cache in items) and doomed.length >= len(PROMPTS[3]):
            raise RuntimeError("broken drafter context")
        extend(items)

    engine.draft.extend_contexts = extend_unless_doomed
    drive(engine, gens)
    assert gens[0].finish_reason == "error"
    for g in gens[1:]:
        assert g.finish_reason == "length"
        assert g.token_ids == alone(engine, g.prompt_ids, max_new_tokens=30, method="ar")


def test_a_step_stopped_between_layers_commits_nothing_and_every_sequence_stays_exact():
    """Every third step is stopped mid-forward (as a voice turn arriving does): prompts mid-prefill,
    chains, trees and a seeded sampled request all end with exactly what they make unstopped."""
    engine = make_engine()
    sampled = dict(max_new_tokens=25, method="domino", temperature=0.9, seed=5, adaptive_drafts=False)
    kws = [dict(max_new_tokens=30, method=m, **kw) for m, kw in
           (("ar", {}), ("domino", {}), ("domino+ngram", {}), ("domino", dict(draft_tree=False)))]
    refs = [alone(engine, PROMPTS[i], **kw) for i, kw in enumerate(kws)] + [alone(engine, PROMPTS[4], **sampled)]
    gens = [engine.stream(PROMPTS[i], GenerationRequest(**kw)) for i, kw in enumerate(kws)]
    gens.append(engine.stream(PROMPTS[4], GenerationRequest(**sampled)))
    steps, stopped = 0, 0
    while any(g.finish_reason is None for g in gens):
        calls = []
        stop = (lambda: calls.append(1) or len(calls) > 2) if steps % 3 == 2 else None  # after layer 2
        before = [(len(g.token_ids), g.stats.rounds) for g in gens]
        results = engine.step(gens, stop=stop)
        if stop is not None and len(calls) > 2:
            stopped += 1
            assert results == [""] * len(gens) and [(len(g.token_ids), g.stats.rounds) for g in gens] == before
        steps += 1
    assert stopped >= 5
    assert [g.token_ids for g in gens] == refs
