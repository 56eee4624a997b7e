"""A small preference set the project ships: arithmetic questions, a correct and polite answer preferred to a
wrong or rude one.

The rule is learnable from the text alone (the chosen answer states the right result and answers the question;
the rejected one gives another number, or refuses rudely), so a short DPO or ORPO run on the embedded tiny model
shows the reward margin and accuracy rise. Rows are TRL's plain-text shape ``{"prompt", "chosen", "rejected"}``.

``examples/preference/data/*.jsonl`` are produced by :func:`write_sample_preference`; a test regenerates them and
compares bytes.

>>> row = generate_pairs(n_train=1, n_eval=0, seed=0)[0][0]
>>> sorted(row)
['chosen', 'prompt', 'rejected']
"""

from __future__ import annotations

import random
from pathlib import Path

from lorafit.data.sample import split_generated, write_jsonl_files

OPERATIONS = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
QUESTIONS = ["What is {a} {op} {b}?", "Please compute {a} {op} {b}.", "How much is {a} {op} {b}?"]
ANSWERS = ["{a} {op} {b} is {result}.", "The answer is {result}.", "Sure! {a} {op} {b} equals {result}."]
RUDE = ["Work it out yourself.", "That is a silly question.", "I will not do your homework."]


def _pair(rng: random.Random) -> dict:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    op, fn = rng.choice(OPERATIONS)
    answer = rng.choice(ANSWERS)
    result = fn(a, b)
    if rng.random() < 0.7:  # a wrong result in the same words: only the number tells them apart
        rejected = answer.format(a=a, op=op, b=b, result=result + rng.choice([-3, -2, -1, 1, 2, 3]))
    else:
        rejected = rng.choice(RUDE)
    return {"prompt": rng.choice(QUESTIONS).format(a=a, op=op, b=b),
            "chosen": answer.format(a=a, op=op, b=b, result=result), "rejected": rejected}


def generate_pairs(n_train: int = 256, n_eval: int = 32, seed: int = 2024) -> tuple[list[dict], list[dict]]:
    """Deterministic train and eval pairs; no eval prompt repeats a training one."""
    return split_generated(_pair, lambda row: row["prompt"], n_train, n_eval, seed)


def write_sample_preference(folder: Path) -> list[Path]:
    """Write ``preference_train.jsonl`` and ``preference_eval.jsonl`` into ``folder``."""
    return write_jsonl_files(folder, zip(("preference_train.jsonl", "preference_eval.jsonl"), generate_pairs()))


if __name__ == "__main__":  # python -m lorafit.data.sample_preference FOLDER
    import sys

    for written in write_sample_preference(Path(sys.argv[1])):
        print(written)
