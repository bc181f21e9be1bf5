"""The zoo's four domains, made from what every Python installation has or from seeded generators.

- `code`: Python source of the standard library (its top-level `*.py` modules).
- `prose`: English prose, the language-reference topics that ship with CPython (`pydoc_data.topics`),
  without their indented code examples and grammar rules.
- `math`: generated arithmetic, one worked equation per line.
- `json`: generated structured records, one JSON object per line.

Each domain is a list of documents split three ways by document: of every `HELDOUT_EVERY`
documents of the sorted list, the last is held out (`heldout`: the demo's test text), the fifth is
kept for validation (`validation`: what the demo chooses its routers on) and the rest is `train`.
No model of the zoo ever trains on a held-out or validation document, and the demo's choices never
see the held-out ones. Everything is deterministic: sorted file lists and `random.Random(seed)`.
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("code", "prose", "math", "json")
HELDOUT_EVERY = 10
VALIDATION_AT = 4  # position, within each run of HELDOUT_EVERY documents, of the validation document
# The standard library's larger modules would dominate the code domain; bytes kept per file.
MAX_FILE_CHARS = 12_000

FIRST_NAMES = [
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Barbara",
    "Donald",
    "Edsger",
    "Frances",
    "Guido",
    "Hedy",
    "Ken",
    "Margaret",
    "Niklaus",
    "Radia",
    "Tim",
    "Yukihiro",
]
LAST_NAMES = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Liskov",
    "Knuth",
    "Dijkstra",
    "Allen",
    "Rossum",
    "Lamarr",
    "Thompson",
    "Hamilton",
    "Wirth",
    "Perlman",
    "Berners-Lee",
    "Matsumoto",
]
CITIES = ["London", "Paris", "Berlin", "Tokyo", "Lima", "Nairobi", "Oslo", "Madrid", "Toronto", "Sydney", "Delhi", "Cairo"]
TAGS = ["admin", "beta", "premium", "trial", "staff", "guest", "verified", "archived"]
PRODUCTS = ["keyboard", "monitor", "laptop", "cable", "mouse", "headset", "webcam", "charger"]


@dataclass(frozen=True)
class Domain:
    """One domain's documents, already split."""

    name: str
    train: list[str]
    validation: list[str]
    heldout: list[str]


def code_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 500:
            documents.append(text[:MAX_FILE_CHARS])
    return documents


def prose_documents() -> list[str]:
    """The topics' English text. Their indented lines (code examples, grammar rules, tables) are left
    out, so that prose is prose and Python is the code domain's."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        text = "\n".join(line for line in topics[name].splitlines() if not line.startswith((" ", "\t")))
        documents.append(re.sub(r"\n{3,}", "\n\n", text).strip() + "\n")
    return documents


def math_documents(count: int, seed: int) -> list[str]:
    """Documents of 12 worked arithmetic lines each, e.g. `37 + 48 = 85`."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        lines = []
        for _ in range(12):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            if op == "*":
                a, b = a % 100, b % 100
            result = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {result}")
        documents.append("\n".join(lines) + "\n")
    return documents


def json_documents(count: int, seed: int) -> list[str]:
    """Documents of 4 records each, one JSON object per line."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        records = []
        for _ in range(4):
            record = {
                "id": rng.randint(1, 99999),
                "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
                "age": rng.randint(18, 90),
                "city": rng.choice(CITIES),
                "active": rng.random() < 0.5,
                "tags": sorted(rng.sample(TAGS, rng.randint(0, 3))),
                "order": {"product": rng.choice(PRODUCTS), "quantity": rng.randint(1, 9), "price": round(rng.uniform(1, 500), 2)},
            }
            records.append(json.dumps(record))
        documents.append("\n".join(records) + "\n")
    return documents


def _split(name: str, documents: list[str]) -> Domain:
    position = [i % HELDOUT_EVERY for i in range(len(documents))]
    heldout = [doc for doc, at in zip(documents, position) if at == HELDOUT_EVERY - 1]
    validation = [doc for doc, at in zip(documents, position) if at == VALIDATION_AT]
    train = [doc for doc, at in zip(documents, position) if at not in (HELDOUT_EVERY - 1, VALIDATION_AT)]
    return Domain(name, train, validation, heldout)


def load_domains(seed: int = 0, generated_documents: int = 2000) -> dict[str, Domain]:
    """All four domains, each split into train, validation and held-out documents."""
    return {
        "code": _split("code", code_documents()),
        "prose": _split("prose", prose_documents()),
        "math": _split("math", math_documents(generated_documents, seed)),
        "json": _split("json", json_documents(generated_documents, seed + 1)),
    }
