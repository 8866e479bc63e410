"""RL-shaped waves for the benchmarks: most responses short, a few very long (the tail that
decides when a rollout ends), at temperature 1, with lengths fixed per sample (`ignore_eos`)
so that every engine and mode generates exactly the same number of tokens."""

from __future__ import annotations

import numpy as np

from ..protocol import ChatMessage, RolloutRequest, SamplingParams

PROMPTS = [
    "Tell me a long story about a dragon.", "Explain how a car engine works.", "Write a poem about the ocean.",
    "What are the benefits of exercise?", "Describe the water cycle.", "How do computers store data?",
    "Write a letter to a friend.", "Explain the theory of evolution.", "What is machine learning?",
    "Describe a day in the life of a farmer.", "How do airplanes fly?", "Write a recipe for pancakes.",
    "Explain photosynthesis step by step.", "What causes the seasons?", "Tell me about the history of Rome.",
    "How does the internet work?",
]


def long_tail_lengths(n: int, max_len: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(48), 0.9, n))
    lengths[rng.choice(n, min(2, n), replace=False)] = max_len  # the tail that decides when the wave ends
    return [int(x) for x in np.clip(lengths, 8, max_len)]


def wave_requests(max_len: int, seed: int) -> list[RolloutRequest]:
    lengths = long_tail_lengths(64, max_len, seed)
    return [
        RolloutRequest(id=str(i), messages=[ChatMessage("user", PROMPTS[i % 16])],
                       sampling=SamplingParams(temperature=1.0, max_new_tokens=lengths[i], ignore_eos=True, seed=seed * 1000 + i))
        for i in range(64)
    ]
