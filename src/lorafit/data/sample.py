"""The bundled sample task: pull four fields out of a sentence and answer in JSON.

The task is small enough for the embedded tiny model to learn in a couple of CPU minutes, and its answers can
be checked exactly (the JSON either matches or it does not), which later evaluation work relies on.

The shipped files under ``lorafit/resources/data`` (and their copy in ``examples/data``) are produced by
:func:`write_sample_data`; a test regenerates them and compares bytes, so they never drift from this code.

>>> train, _ = generate_conversations(n_train=1, n_eval=0, seed=0)
>>> [m["role"] for m in train[0]["messages"]]
['system', 'user', 'assistant']
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM_PROMPT = "Extract name, age, city and job from the text. Answer with JSON only."

FIRST_NAMES = [
    "Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
    "Maria", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe",
]
LAST_NAMES = [
    "Lopez", "Smith", "Dubois", "Kim", "Rossi", "Novak", "Haddad", "Berg", "Costa", "Ito", "Khan", "Meyer",
    "Olsen", "Petrov", "Silva", "Tanaka", "Weber", "Young",
]
CITIES = [
    "Lisbon", "Paris", "Berlin", "Madrid", "Oslo", "Vienna", "Prague", "Dublin", "Rome", "Athens", "Warsaw",
    "Zurich", "Tokyo", "Seoul", "Cairo", "Lima", "Quito", "Denver", "Austin", "Boston",
]
JOBS = [
    "nurse", "teacher", "pilot", "baker", "lawyer", "farmer", "chemist", "painter", "dentist", "plumber",
    "engineer", "librarian", "carpenter", "designer", "journalist", "architect",
]
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}, {age}, a {job} from {city}.",
    "{name} works as a {job} in {city} and is {age} years old.",
    "At {age}, {name} is a {job} based in {city}.",
    "In {city}, {name} ({age}) works as a {job}.",
    "{name}, aged {age}, has been a {job} in {city} for years.",
    "Our new {job} is {name}; {name} is {age} and moved to {city}.",
    "The {job} {name} is {age} and lives in {city}.",
]


def random_person(rng: random.Random) -> dict:
    """One person of the extraction task (the draws, in this order, fix the shipped data files)."""
    return {
        "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "age": rng.randint(19, 79),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }


def _conversation(rng: random.Random) -> dict:
    person = random_person(rng)
    sentence = rng.choice(TEMPLATES).format(**person)
    answer = json.dumps(person, ensure_ascii=False)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": answer},
        ]
    }


def generate_conversations(n_train: int = 1200, n_eval: int = 120, seed: int = 1234) -> tuple[list, list]:
    """Deterministic train and eval conversations; eval rows never repeat a train row's user text."""
    rng = random.Random(seed)
    train = [_conversation(rng) for _ in range(n_train)]
    seen = {row["messages"][1]["content"] for row in train}
    evaluation: list[dict] = []
    while len(evaluation) < n_eval:
        row = _conversation(rng)
        if row["messages"][1]["content"] not in seen:
            seen.add(row["messages"][1]["content"])
            evaluation.append(row)
    return train, evaluation


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_sample_data(folder: Path) -> list[Path]:
    """Write ``quickstart_train.jsonl`` and ``quickstart_eval.jsonl`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train, evaluation = generate_conversations()
    paths = []
    for name, rows in (("quickstart_train.jsonl", train), ("quickstart_eval.jsonl", evaluation)):
        path = folder / name
        path.write_text(_jsonl(rows), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m lorafit.data.sample FOLDER
    import sys

    for written in write_sample_data(Path(sys.argv[1])):
        print(written)
