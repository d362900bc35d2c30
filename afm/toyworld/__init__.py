"""The embedded tiny world: its corpus and test problems, its tokenizer, its LoRA tasks.

* ``world`` / ``scoring`` — the seeded procedural corpus and splits, and accuracy on
  its problems (both re-exported here);
* ``tokenizer`` — the byte-level BPE tokenizer of the tiny teacher;
* ``lora_tasks`` — new tasks for AHWA-LoRA adapters (``afm-lora --task mul``).
"""

from afm.toyworld.scoring import evaluate_arith, evaluate_facts, parse_answer
from afm.toyworld.world import (
    ANSWER_RE,
    ATTRIBUTES,
    SPLITS,
    WORLD_SEED,
    ArithProblem,
    FactQuestion,
    ToyWorldConfig,
    World,
    arith_problems,
    arith_text,
    fact_questions,
    make_world,
    narrative_paragraph,
    narratives,
    sample_arith,
    split_of,
    tasks_dir,
    training_documents,
)

__all__ = [
    "ANSWER_RE",
    "ATTRIBUTES",
    "SPLITS",
    "WORLD_SEED",
    "ArithProblem",
    "FactQuestion",
    "ToyWorldConfig",
    "World",
    "arith_problems",
    "arith_text",
    "evaluate_arith",
    "evaluate_facts",
    "fact_questions",
    "make_world",
    "narrative_paragraph",
    "narratives",
    "parse_answer",
    "sample_arith",
    "split_of",
    "tasks_dir",
    "training_documents",
]
