"""Sampling against llama.cpp's own samplers (llama-sampler.cpp, called through
llama-cpp-python): the same logits through the same chain must leave the same candidates
with the same logits; greedy must pick llama.cpp's token; the draw must follow the
probabilities llama.cpp's dist sampler assigns."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gguflm.engine.sampling import (SamplingParams, apply_penalties, apply_temperature, min_p, sample,
                                    top_k, top_p)


def llama_chain(llama_cpp, samplers, logits: np.ndarray, history=()):
    """Run llama.cpp's sampler chain on ``logits``: (ids, logits, probs, selected index)."""
    n = len(logits)
    data = (llama_cpp.llama_token_data * n)(*[llama_cpp.llama_token_data(i, float(x), 0.0)
                                              for i, x in enumerate(logits)])
    cur = llama_cpp.llama_token_data_array(data, n, -1, False)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        for s in samplers:
            llama_cpp.llama_sampler_chain_add(chain, s)
        for t in history:
            llama_cpp.llama_sampler_accept(chain, int(t))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
        ids = np.array([data[i].id for i in range(cur.size)])
        lg = np.array([data[i].logit for i in range(cur.size)], dtype=np.float32)
        pr = np.array([data[i].p for i in range(cur.size)], dtype=np.float32)
        return ids, lg, pr, cur.selected
    finally:
        llama_cpp.llama_sampler_free(chain)


def as_dict(ids, logits) -> dict[int, float]:
    """The candidates left (a filtered-out candidate of ours keeps its place at -inf)."""
    return {int(i): float(x) for i, x in zip(ids, logits) if np.isfinite(float(x))}


params_st = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "n": st.sampled_from([7, 64, 300, 2000]),
    "scale": st.sampled_from([0.5, 3.0, 12.0]),
    "k": st.sampled_from([0, 1, 5, 40, 5000]),
    "p": st.sampled_from([0.3, 0.9, 0.95, 1.0]),
    "minp": st.sampled_from([0.0, 0.05, 0.3]),
    "temp": st.sampled_from([0.5, 0.8, 1.5]),
})


@settings(max_examples=60, deadline=None)
@given(params_st)
def test_filter_chain_matches_llama_cpp(llama_cpp, prm):
    rng = np.random.default_rng(prm["seed"])
    logits = (rng.standard_normal(prm["n"]) * prm["scale"]).astype(np.float32)
    ids, lg, _, _ = llama_chain(llama_cpp, [
        llama_cpp.llama_sampler_init_top_k(prm["k"]),
        llama_cpp.llama_sampler_init_top_p(prm["p"], 0),
        llama_cpp.llama_sampler_init_min_p(prm["minp"], 0),
        llama_cpp.llama_sampler_init_temp(prm["temp"]),
    ], logits)
    cand = (torch.arange(prm["n"]), torch.from_numpy(logits))
    cand = apply_temperature(min_p(top_p(top_k(cand, prm["k"]), prm["p"]), prm["minp"]), prm["temp"])
    ours, theirs = as_dict(*cand), as_dict(ids, lg)
    assert ours.keys() == theirs.keys()
    np.testing.assert_allclose([ours[i] for i in theirs], list(theirs.values()), rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 8, 64]),
       st.sampled_from([1.0, 1.1, 0.8]), st.sampled_from([0.0, 0.5]), st.sampled_from([0.0, 0.3]))
def test_penalties_match_llama_cpp(llama_cpp, seed, last_n, repeat, freq, present):
    rng = np.random.default_rng(seed)
    n = 50
    logits = (rng.standard_normal(n) * 4).astype(np.float32)
    history = rng.integers(0, n, size=int(rng.integers(0, 100))).tolist()
    ids, lg, _, _ = llama_chain(llama_cpp, [llama_cpp.llama_sampler_init_penalties(n, last_n, repeat, freq, present)],
                                logits, history)
    window = history[-last_n:] if last_n else []
    prm = SamplingParams(repeat_penalty=repeat, repeat_last_n=last_n, frequency_penalty=freq,
                         presence_penalty=present)
    ours = apply_penalties(torch.from_numpy(logits), window, repeat, freq, present) \
        if prm.penalties_enabled else torch.from_numpy(logits)
    theirs = np.empty(n, dtype=np.float32)
    theirs[ids] = lg
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_greedy_picks_llama_cpp_token(llama_cpp, seed):
    rng = np.random.default_rng(seed)
    n = 1000
    logits = (rng.standard_normal(n) * 3).astype(np.float32)
    history = rng.integers(0, n, size=30).tolist()
    ids, _, _, sel = llama_chain(llama_cpp, [
        llama_cpp.llama_sampler_init_penalties(n, 64, 1.3, 0.1, 0.2),
        llama_cpp.llama_sampler_init_top_k(40), llama_cpp.llama_sampler_init_top_p(0.95, 0),
        llama_cpp.llama_sampler_init_min_p(0.05, 0), llama_cpp.llama_sampler_init_temp(0.0),
        llama_cpp.llama_sampler_init_dist(seed),
    ], logits, history)
    prm = SamplingParams(temperature=0.0, repeat_penalty=1.3, frequency_penalty=0.1, presence_penalty=0.2)
    assert sample(torch.from_numpy(logits), prm, history) == int(ids[sel])


@pytest.mark.parametrize("temp,k,p,minp", [(1.0, 0, 1.0, 0.0), (0.8, 40, 0.95, 0.05)])
def test_draws_follow_llama_cpp_probabilities(llama_cpp, temp, k, p, minp):
    rng = np.random.default_rng(7)
    n = 200
    logits = (rng.standard_normal(n) * 2).astype(np.float32)
    ids, _, probs, _ = llama_chain(llama_cpp, [
        llama_cpp.llama_sampler_init_top_k(k), llama_cpp.llama_sampler_init_top_p(p, 0),
        llama_cpp.llama_sampler_init_min_p(minp, 0), llama_cpp.llama_sampler_init_temp(temp),
        llama_cpp.llama_sampler_init_dist(1),
    ], logits)
    expected = np.zeros(n)
    expected[ids] = probs
    prm = SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=minp)
    gen = torch.Generator().manual_seed(3)
    draws = 4000
    counts = np.bincount([sample(torch.from_numpy(logits), prm, (), gen) for _ in range(draws)], minlength=n)
    assert set(np.flatnonzero(counts)) <= set(ids.tolist())      # never outside llama.cpp's candidates
    # mass in 5 groups of token ids of about 0.2 expected mass each: standard error < 0.007
    edges = np.searchsorted(np.cumsum(expected), [0.2, 0.4, 0.6, 0.8], side="right") + 1
    observed = np.array([g.sum() for g in np.split(counts / draws, edges)])
    wanted = np.array([g.sum() for g in np.split(expected, edges)])
    assert np.abs(observed - wanted).max() < 0.03, (observed, wanted)


def test_bad_params_refused():
    for bad in [dict(temperature=float("nan")), dict(repeat_penalty=0.0), dict(repeat_last_n=-2),
                dict(top_p=float("inf")), dict(min_p=5.0), dict(min_p=-0.1), dict(top_p=0.0),
                dict(seed=2**70), dict(seed=-1)]:  # the server's ranges; min_p > 1 keeps no candidate
        with pytest.raises(ValueError):
            SamplingParams(**bad)
