"""Reward functions for examples/grpo/ages.yaml, loaded as `age_rewards:<function>` from this folder (a plugin:
lorafit imports modules next to the config). Each is called f(prompts, completions, **row_fields) and returns one
float per completion; row fields (here `reference`, the age) arrive as lists, one value per completion."""


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def digit_share(prompts, completions, **_):
    """The share of the answer's visible characters that are digits: 0.0 for words, 1.0 for "26". Dense, so a
    random model's answers already differ and GRPO has a direction to push from the first step."""
    out = []
    for completion in completions:
        chars = [c for c in _text(completion) if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out


def says_the_age(prompts, completions, reference, **_):
    """1.0 when the answer contains the right age (the row's reference), else 0.0."""
    return [1.0 if age in _text(completion) else 0.0 for completion, age in zip(completions, reference)]
