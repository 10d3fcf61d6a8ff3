"""A copy-heavy workload for speculative decoding: chat prompts that ask to repeat, or lightly edit,
a passage given in the prompt (`pagoda bench latency --prompts copy`).

Such answers continue text the prompt already holds, which is what n-gram (prompt-lookup)
drafts guess; the passages are plain prose that a small instruct model (the embedded
SmolLM2-135M) repeats faithfully.
"""

from __future__ import annotations

from typing import Any

PASSAGES = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
    "step. All that glitters is not gold. Actions speak louder than words. Knowledge is power, and time "
    "is money. Where there is a will, there is a way.",
    "The library opens at nine in the morning and closes at six in the evening. Visitors may borrow up "
    "to five books at a time for three weeks. Books can be renewed twice online or at the front desk. "
    "Late returns cost ten cents a day, and lost books must be replaced.",
    "To make the soup, chop two onions, three carrots and four sticks of celery. Cook them slowly in "
    "olive oil for ten minutes. Add a litre of vegetable stock, a tin of tomatoes and a handful of "
    "lentils. Simmer for thirty minutes, then season with salt and pepper.",
    "The train leaves the central station every hour, on the hour, from six in the morning until "
    "midnight. The journey to the airport takes forty minutes. Tickets can be bought from the machines "
    "on the platform or from the driver, and children under twelve travel free.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is "
    "lower, so water boils at a lower temperature. This is why cooking pasta in the mountains takes "
    "longer than cooking it at the beach.",
    "Our office will be closed on Monday for the public holiday. Orders placed over the weekend will be "
    "shipped on Tuesday. If you have any questions, please write to our support team, who will answer "
    "within one working day. Thank you for your patience.",
]

INSTRUCTIONS = [
    "Repeat the following text exactly, word for word:\n\n{passage}",
    "Copy the following paragraph exactly as it is written:\n\n{passage}",
]


def copy_messages() -> list[list[dict[str, Any]]]:
    """One single-turn chat per passage, the instructions alternating."""
    return [
        [{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)].format(passage=p)}]
        for i, p in enumerate(PASSAGES)
    ]


def copy_prompt_ids(model: str | None) -> list[list[int]]:
    """The copy chats through the model's chat template, as token ids."""
    from protocol import EngineConfig
    from tokenizer_svc.tokenizer_loader import load_tokenizer

    tokenizer = load_tokenizer(EngineConfig(model=model))
    return [
        list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for m in copy_messages()
    ]
