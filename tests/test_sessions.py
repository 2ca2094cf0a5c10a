"""The runtime's program interface on both targets: sessions over one copy of the weights, many
rows per call, truncation, embedding rows; speculative decoding (prompt lookup and a draft
model), greedy and sampled; bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from scipy import stats as scipy_stats

import edgellm
from conftest import build
from edgellm.errors import EdgeLLMError
from edgellm.runtime import engine as engine_module
from edgellm.runtime.native import NativeEngine
from edgellm.runtime.sampling import Sampler, SamplingParams
from edgellm.runtime.strategies import DraftLength, PromptLookup, verify
from edgellm.targets.native.toolchain import Toolchain, build_programs
from tiny_models import VOCAB, save_tiny

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)
TARGETS = ["cpu", "native"]
RNG = np.random.default_rng(31)
PROMPT = [int(t) for t in RNG.integers(1, VOCAB, 37)]  # two groups and a short one


@pytest.fixture(scope="module", params=TARGETS)
def tiny(request, tmp_path_factory):
    """(target, HF directory, build) of a tiny gemma3 (embedding scale, sliding windows), fp32."""
    root = tmp_path_factory.mktemp(f"sessions-{request.param}")
    plan = root / "fp32.json"
    plan.write_text('{"default": {"precision": "FP32"}}')
    model_dir = save_tiny("gemma3", root / "hf")
    return request.param, model_dir, build(model_dir, root / "out", plan, target=request.param, **OPTIONS)


def test_sessions_keep_their_own_caches_over_one_copy_of_the_weights(tiny):
    _, _, out = tiny
    model = edgellm.load(out)
    first, second = model.engine.open_session(), model.engine.open_session()
    expected = first.prompt_logits(PROMPT[:20])
    second.prompt_logits(PROMPT[20:])  # other tokens at the same positions, in the other cache
    fresh = model.engine.open_session()
    np.testing.assert_allclose(first.decode(PROMPT[20], 20), fresh.prefill(PROMPT[:21], 0), atol=1e-5)
    if tiny[0] == "native":  # one library, one weights mapping: no private copy of libmodel.so
        assert not list((out / "compiled" / "native").glob(".edgellm-model-*"))
        assert first.engine is second.engine
    assert np.array_equal(model.engine.open_session().prompt_logits(PROMPT[:20]), expected)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_one_call_of_n_rows_gives_every_rows_logits_as_one_row_calls_do(tiny, n):
    session = edgellm.load(tiny[2]).engine.open_session()
    session.prefill(PROMPT[:10], 0)
    rows = session.forward(PROMPT[10 : 10 + n], 10, logits_from=0)
    assert rows.shape == (n, VOCAB)
    one_by_one = edgellm.load(tiny[2]).engine.open_session()
    one_by_one.prefill(PROMPT[:10], 0)
    expected = np.stack([one_by_one.decode(t, 10 + i) for i, t in enumerate(PROMPT[10 : 10 + n])])
    assert np.abs(rows - expected).max() < 1e-4 * np.abs(expected).max()
    # the last rows only
    again = edgellm.load(tiny[2]).engine.open_session()
    again.prefill(PROMPT[:10], 0)
    assert np.abs(again.forward(PROMPT[10 : 10 + n], 10, logits_from=n - 1) - expected[-1:]).max() < 1e-4


def test_a_batched_step_of_several_sessions_gives_each_row_its_decode_logits(tiny):
    """Engine.forward_batch (the server's decode step): rows of sessions at different positions,
    one session giving two rows, more rows than one native call takes; each row's logits are
    exactly its own session's decode step's."""
    _, _, out = tiny
    model = edgellm.load(out)
    prompts = [PROMPT[:5], PROMPT[:17], PROMPT[3:12], PROMPT[:9], PROMPT[20:30], PROMPT[:2], PROMPT[6:30], PROMPT[1:4]]
    follow = [[int(t)] for t in RNG.integers(1, VOCAB, len(prompts))]
    follow[1] = [7, 11]  # a verify-like pair of rows in the same batch
    batched, alone = [], []
    for p in prompts:
        for group in (batched, alone):
            session = model.engine.open_session()
            session.prefill(p, 0)
            group.append(session)
    rows = model.engine.forward_batch([(s, ids, len(p)) for s, ids, p in zip(batched, follow, prompts)])
    for s, ids, p, got in zip(alone, follow, prompts, rows):
        expected = np.stack([s.decode(token, len(p) + i) for i, token in enumerate(ids)])
        np.testing.assert_array_equal(got, expected)
    assert [s.length for s in batched] == [len(p) + len(ids) for p, ids in zip(prompts, follow)]
    model.close()


def test_truncate_forgets_positions_in_place(tiny):
    model = edgellm.load(tiny[2])
    session = model.engine.open_session()
    session.prefill(PROMPT[:30], 0)
    session.truncate(12)
    assert session.length == 12
    other = [int(t) for t in RNG.integers(1, VOCAB, 6)]
    got = session.forward(other, 12, logits_from=0)
    fresh = model.engine.open_session()
    fresh.prefill(PROMPT[:12], 0)
    np.testing.assert_allclose(got, fresh.forward(other, 12, logits_from=0), atol=1e-5)
    with pytest.raises(EdgeLLMError, match="cannot truncate a session of 18 positions to 19"):
        session.truncate(19)


def test_a_copied_cache_continues_in_another_session_as_in_its_own(tiny):
    """copy_cache / load_cache (the server's store of finished conversations): a session loaded
    with a copy's first positions, whatever it held before, computes bit for bit what the session
    that made the copy computed; a copy keeps only the positions it was asked for."""
    model = edgellm.load(tiny[2])
    engine = model.engine
    reference = engine.open_session()
    reference.forward(PROMPT[:16], 0)
    reference.forward(PROMPT[16:20], 16)
    expected = reference.forward(PROMPT[20:33], 20, logits_from=0)
    expected_next = reference.decode(PROMPT[33], 33)

    source = engine.open_session()
    source.forward(PROMPT[:16], 0)
    source.forward(PROMPT[16:20], 16)
    source.forward(PROMPT[::-1][:14], 20)  # later positions hold other tokens: copied, then not loaded
    copy = source.copy_cache(34)  # three blocks of 16 keys, of which two are loaded
    assert copy.length == 34
    source.truncate(0)  # the copy is its own memory
    source.prefill(PROMPT[5:30], 0)

    target = engine.open_session()
    target.prefill(PROMPT[::-1][:40], 0)  # a cache full of something else
    target.load_cache(copy, 20)
    assert target.length == 20
    assert np.array_equal(target.forward(PROMPT[20:33], 20, logits_from=0), expected)
    assert np.array_equal(target.decode(PROMPT[33], 33), expected_next)

    assert engine.open_session().copy_cache(0).length == 0
    assert copy.nbytes < engine.session_bytes() and source.copy_cache(8).nbytes < source.copy_cache(25).nbytes
    with pytest.raises(EdgeLLMError, match="cannot load 35 positions of a cache copy holding 34"):
        target.load_cache(copy, 35)
    with pytest.raises(EdgeLLMError, match="cannot copy 35 positions of a session holding 34"):
        target.copy_cache(35)
    other = edgellm.load(tiny[2])
    with pytest.raises(EdgeLLMError, match="a cache copy made by another model"):
        other.engine.open_session().load_cache(copy, 10)
    model.close()
    with pytest.raises(EdgeLLMError, match="closed"):
        target.copy_cache(5)


def test_embedding_rows_give_the_logits_of_their_token_ids(tiny):
    """Rows given as transformers' inputs_embeds (Gemma's scale included) compute what the ids do,
    alone or mixed with token rows."""
    _, model_dir, out = tiny
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        embeddings = reference.get_input_embeddings()(torch.tensor(PROMPT[:16])).numpy()
    model = edgellm.load(out)
    by_id = model.engine.open_session().forward(PROMPT[:16], 0, logits_from=0)
    all_rows = model.engine.open_session().forward([-1] * 16, 0, logits_from=0, embeddings=embeddings)
    assert np.abs(all_rows - by_id).max() < 1e-4 * np.abs(by_id).max()
    mixed_ids = [-1 if i % 3 == 0 else t for i, t in enumerate(PROMPT[:16])]
    mixed = model.engine.open_session().forward(mixed_ids, 0, logits_from=0, embeddings=embeddings)
    assert np.abs(mixed - by_id).max() < 1e-4 * np.abs(by_id).max()
    session = model.engine.open_session()  # decode rows too
    session.prefill(PROMPT[:16], 0)
    with torch.no_grad():
        row = reference.get_input_embeddings()(torch.tensor(PROMPT[16:17])).numpy()
    np.testing.assert_allclose(session.forward([-1], 16, embeddings=row)[0],
                               model.engine.open_session().prefill(PROMPT[:17], 0), atol=1e-4)
    with pytest.raises(EdgeLLMError, match="negative id takes an embedding vector, and no embeddings were given"):
        model.engine.open_session().forward([-1, 3], 0)
    with pytest.raises(EdgeLLMError, match=r"embeddings of shape \(2, 7\)"):
        model.engine.open_session().forward([-1, 3], 0, embeddings=np.zeros((2, 7), np.float32))


def test_a_session_of_a_closed_model_raises(tiny):
    model = edgellm.load(tiny[2])
    session = model.session()
    session.generate_ids(PROMPT[:8], max_new_tokens=2)
    model.close()
    model.close()  # twice is harmless
    with pytest.raises(EdgeLLMError, match="closed"):
        session.generate_ids(PROMPT[:8], max_new_tokens=2)
    with pytest.raises(EdgeLLMError, match="this model was closed"):
        model.session()


def test_more_sessions_than_memory_allows_are_refused_before_allocating(tiny, monkeypatch):
    model = edgellm.load(tiny[2])
    monkeypatch.setattr(engine_module, "available_memory", lambda: 1000)
    with pytest.raises(EdgeLLMError, match=r"a new session needs .* MB .*; 0 MB are available"):
        model.session()


# ---- speculative decoding -----------------------------------------------------------------

def _prompts():
    rng = np.random.default_rng(8)
    block = [int(t) for t in rng.integers(1, VOCAB, 24)]
    return [block + block[:10],  # repeats itself: lookup drafts from it
            [int(t) for t in rng.integers(1, VOCAB, 30)],  # no repeats
            block[:5] * 4]


@pytest.mark.parametrize("how", ["lookup", "self-draft", "other-draft"])
def test_greedy_speculation_gives_the_plain_greedy_tokens(tiny, tmp_path, how):
    target, _, out = tiny
    model = edgellm.load(out)
    if how == "lookup":
        kw = {"lookup": 3}
    elif how == "self-draft":  # every draft is accepted: long accepted runs
        kw = {"draft": out}
    else:  # another model with the same vocabulary: most drafts are rejected
        other = build(save_tiny("gemma3", tmp_path / "hf", seed=5), tmp_path / "draft", "int4", target=target,
                      **OPTIONS)
        kw = {"draft": other}
    for prompt in _prompts():
        model.reset()
        plain = model.generate_ids(prompt, max_new_tokens=48, ignore_eos=True)
        model.reset()
        fast = model.generate_ids(prompt, max_new_tokens=48, ignore_eos=True, draft_max=4, **kw)
        assert fast.token_ids == plain.token_ids
        assert fast.speculation["accepted"] <= fast.speculation["drafted"]
    if how == "self-draft":  # every draft is the target's own token (how many it drafts follows the timings)
        assert fast.speculation["acceptance_rate"] == 1.0 and fast.speculation["accepted"] > 0


def test_speculation_near_the_end_of_the_context_stops_where_plain_decoding_does(tiny):
    model = edgellm.load(tiny[2])
    prompt = (PROMPT * 4)[:110]
    plain = model.generate_ids(prompt, max_new_tokens=40, ignore_eos=True)
    model.reset()
    fast = model.generate_ids(prompt, max_new_tokens=40, ignore_eos=True, lookup=2, draft_max=8)
    assert fast.token_ids == plain.token_ids and fast.finish_reason == plain.finish_reason == "context"


def test_the_rejection_rule_keeps_the_target_distribution(tiny):
    """verify()'s first token, over many draws with a fixed seed, is distributed as the target's
    sampling distribution, for a sampled draft (q from another row's logits) and a deterministic
    one (prompt lookup's one-hot q), on a tiny model's real logits."""
    session = edgellm.load(tiny[2]).engine.open_session()
    logits = session.forward(PROMPT[:3], 0, logits_from=0)  # rows: target p (row 1), draft q (row 0)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=12, seed=11))
    p = sampler.distribution(logits[1] * 4)  # sharpened: a few tokens carry the mass
    q = sampler.distribution(logits[0] * 4)
    target_rows = np.stack([logits[1] * 4, logits[2] * 4])
    for deterministic in (False, True):
        counts = np.zeros(VOCAB)
        for _ in range(6000):
            if deterministic:
                draft, distributions = int(np.argmax(q)), None
            else:
                draft = sampler.draw(q)
                distributions = [q]
            kept, following = verify([draft], distributions, target_rows, sampler)
            counts[draft if kept else following] += 1
        support = p > 0
        assert counts[~support].sum() == 0
        result = scipy_stats.chisquare(counts[support], p[support] * counts.sum())
        assert result.pvalue > 1e-3, (deterministic, result)


def test_draft_length_adapts_down_to_not_drafting_and_probes_again():
    length = DraftLength(4)
    assert length.next() == 0  # a plain step first, to time one
    for _ in range(10):  # as the session calls it: every draft rejected, verify rows cheap
        k = length.next()
        length.update(k, 0, 0.0, 0.010 * (1 + 0.05 * k))
    calls = [length.next() for _ in range(DraftLength.PROBE)]
    assert calls.count(1) == 1 and calls.count(0) == DraftLength.PROBE - 1  # one probe token per PROBE calls
    for _ in range(20):
        length.update(4, 4, 0.0, 0.012)
    assert length.next() == 4


@pytest.mark.parametrize("row_cost,draft_cost,expected", [
    (0.05, 0.0, 4),  # cheap verify rows, free drafts (prompt lookup on a small model): draft all 4
    (1.0, 0.0, 0),  # every extra row costs a decode step: drafting cannot win, so none
    (0.05, 3.0, 0),  # a draft model slower than the target: none
])
def test_draft_length_weighs_what_drafting_and_verifying_cost(row_cost, draft_cost, expected):
    """With most drafts accepted, K follows the measured costs (a decode step takes 10 ms)."""
    length = DraftLength(4)
    for _ in range(30):  # every row count timed, as probes and drafts do
        length.update(0, 0, 0.0, 0.010)
        for drafts in range(1, 5):
            length.update(drafts, drafts if RNG.random() < 0.9 ** drafts else drafts - 1, draft_cost * 0.010 * drafts,
                          0.010 * (1 + row_cost * drafts))
    assert length.next() == expected, (length.rate, length.call, length.draft_token)


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(3)
    sampler = Sampler(SamplingParams())
    assert lookup.propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 2, 3, 4], 3, sampler) == ([6, 2, 3], None)
    assert lookup.propose([7, 8, 9], 3, sampler) == ([], None)
    assert lookup.propose([5, 1, 7, 1], 2, sampler) == ([7, 1], None)  # a 1-gram


# ---- the CLI --------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _one_line_error(result, needle):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_refuses_a_prompt_that_is_not_utf8(tiny):
    _, _, out = tiny
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", str(out), "--prompt", b"w1 caf\xe9 w2"],
                            capture_output=True, text=True, timeout=300)
    _one_line_error(result, "not valid UTF-8 (byte e9 at character 6)")


def test_cli_speculation_reports_its_statistics_and_refuses_bad_drafts(tiny, tmp_path):
    target, model_dir, out = tiny
    prompt = " ".join(f"w{t}" for t in _prompts()[0])
    plain = _cli("generate", out, "--prompt", prompt, "-n", 24, "--ignore-eos", "--json")
    fast = _cli("generate", out, "--prompt", prompt, "-n", 24, "--ignore-eos", "--json", "--lookup", 2)
    assert plain.returncode == fast.returncode == 0, fast.stderr
    plain, fast = json.loads(plain.stdout), json.loads(fast.stdout)
    assert fast["text"] == plain["text"] and "speculation" not in plain
    assert fast["speculation"]["drafted"] > 0 and fast["speculation"]["accepted"] <= fast["speculation"]["drafted"]
    _one_line_error(_cli("generate", out, "--prompt", prompt, "--lookup", 2, "--draft-max", 0), "--draft-max 0")
    _one_line_error(_cli("generate", out, "--prompt", prompt, "--draft", tmp_path), "--draft: ")
    _one_line_error(_cli("generate", out, "--prompt", prompt, "--lookup", 0), "--lookup 0")
    # a draft whose tokenizer has other tokens
    other_dir = tmp_path / "other-hf"
    shutil.copytree(model_dir, other_dir)
    tokenizer = json.loads((other_dir / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {f"x{i}": i for i in range(VOCAB)}
    tokenizer["model"]["unk_token"] = "x0"
    (other_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    other = build(other_dir, tmp_path / "other", "int4", target=target, **OPTIONS)
    _one_line_error(_cli("generate", out, "--prompt", prompt, "--draft", other), "vocabulary differs")


def _verify_calls_are_decode_steps(engine, calls):
    """Two sessions of engine after PROMPT[:20]: each (start, n) of calls runs as one call of n rows
    in the first and as n decode steps in the second, with equal logits. Returns the sessions."""
    rows, steps = engine.open_session(), engine.open_session()
    rows.prefill(PROMPT[:20], 0)
    steps.prefill(PROMPT[:20], 0)
    for start, n in calls:
        got = rows.forward(PROMPT[start : start + n], start, logits_from=0)
        expected = np.stack([steps.decode(t, start + i) for i, t in enumerate(PROMPT[start : start + n])])
        assert np.array_equal(got, expected), (start, n, np.abs(got - expected).max())
    return rows, steps


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("preset,int8_activations", [("int4", True), ("int4", False), ("int8", True), ("int8", False),
                                                     ("codebooks", False)])
def test_native_verify_rows_are_bit_identical_to_decode_steps(tmp_path, family, preset, int8_activations):
    """A call of 2..8 rows runs the decode program over them (codegen.Rows): each row's logits
    are exactly a decode step's, with the weights unpacked once for several rows, also where int8 activations make the prefill program's differ,
    so speculative greedy decoding keeps the plain tokens on every native build."""
    if preset == "codebooks":
        preset = tmp_path / "codebooks.json"
        preset.write_text('{"default": {"precision": "A_BF16_W_CB4"}}')
    out = build(save_tiny(family, tmp_path / "hf"), tmp_path / "out", preset, target="native",
                int8_activations=int8_activations, **OPTIONS)
    model = edgellm.load(out)
    # 7 rows (float activations: passes of 4 and 3 rows over each panel), 5 (one pass), 2
    rows, steps = _verify_calls_are_decode_steps(model.engine, ((20, 7), (27, 5), (32, 2)))
    last = rows.forward(PROMPT[34:36], 34, logits_from=1)  # the last row only (kept from all rows' logits)
    steps.decode(PROMPT[34], 34)
    assert last.shape == (1, VOCAB) and np.array_equal(last[0], steps.decode(PROMPT[35], 35))
    model.reset()
    plain = model.generate_ids(PROMPT[:30] + PROMPT[:12], max_new_tokens=40, ignore_eos=True)
    model.reset()
    fast = model.generate_ids(PROMPT[:30] + PROMPT[:12], max_new_tokens=40, ignore_eos=True, lookup=2, draft_max=7)
    assert fast.token_ids == plain.token_ids and fast.speculation["verify_calls"] > 0


def test_avx2_verify_rows_are_bit_identical_to_decode_steps(tmp_path):
    """The AVX2 programs (x86-64-v3) unpack each weight group once for up to 4 verify rows too:
    every row still gets exactly a decode step's logits (7 rows as 4 + 3, then 3 and 2)."""
    if subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip() != "x86_64":
        pytest.skip("x86-64 instruction sets need an x86-64 machine")
    out = build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", "int4", target="native", **OPTIONS)
    other = tmp_path / "avx2"
    other.mkdir()
    for name in ("model.c", "weights.bin", "program.json"):
        shutil.copy(out / "compiled" / "native" / name, other)
    build_programs(Toolchain("native", "cc", ("-march=x86-64-v3",), "gcc"), other)
    try:
        engine = NativeEngine(other, edgellm.load(out).engine.spec)
    except EdgeLLMError as e:  # the program's own guard: this CPU lacks an instruction it was built with
        pytest.skip(f"-march=x86-64-v3: this CPU cannot run it ({e})")
    _verify_calls_are_decode_steps(engine, ((20, 7), (27, 3), (30, 2)))


def test_a_group_of_at_most_eight_rows_still_verifies_with_the_decode_program(tmp_path):
    """With --language_group_size 4 the verify function and the group program take as many rows:
    the verify function wins the tie, so 2..4 rows are still decode steps, bit for bit."""
    out = build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", "int4", target="native", int8_activations=True,
                max_num_tokens=64, language_group_size=4, future_token_mask_size=32)
    table = (out / "compiled" / "native" / "model.c").read_text().split("EM_VARIANTS[")[1]
    assert table.index('{"verify", 4,') < table.index('{"group", 4,')  # em_forward takes the first that fits
    model = edgellm.load(out)
    rows, steps = model.engine.open_session(), model.engine.open_session()
    rows.prefill(PROMPT[:9], 0)
    steps.prefill(PROMPT[:9], 0)
    got = rows.forward(PROMPT[9:13], 9, logits_from=0)
    assert np.array_equal(got, np.stack([steps.decode(t, 9 + i) for i, t in enumerate(PROMPT[9:13])]))


def test_a_draft_with_a_shorter_context_stops_drafting_at_its_end(tiny, tmp_path):
    target, model_dir, out = tiny
    short = build(model_dir, tmp_path / "short", "int4", target=target, max_num_tokens=64, language_group_size=16,
                  future_token_mask_size=32)
    model = edgellm.load(out)
    prompt = (PROMPT * 2)[:50]
    plain = model.generate_ids(prompt, max_new_tokens=60, ignore_eos=True)
    model.reset()
    fast = model.generate_ids(prompt, max_new_tokens=60, ignore_eos=True, draft=short)
    assert fast.token_ids == plain.token_ids and fast.speculation["drafted"] > 0
