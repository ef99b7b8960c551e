"""Needle-in-a-haystack prompts: a distinctive fact inserted into essay text at a sentence
boundary at some depth; the fixed context is the chat prefix plus the essay, the user's input is
the chat-formatted question."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch



# --------------------------------------------------------------------------- needles

@dataclass(frozen=True)
class Needle:
    """A fact to hide, the question that asks for it, the key word a hit must contain, and the
    start of the assistant's answer (a RULER-style answer prefix: short, comparable answers)."""

    fact: str
    question: str
    answer: str
    lead: str


NEEDLES: tuple[Needle, ...] = (
    Needle("The secret ingredient of Hana's soup is cardamom.",
           "What is the secret ingredient of Hana's soup?", "cardamom",
           "The secret ingredient of Hana's soup is"),
    Needle("The name of Dr. Okafor's cat is Biscuit.",
           "What is the name of Dr. Okafor's cat?", "biscuit", "The name of Dr. Okafor's cat is"),
    Needle("The magic number of the Zephyr project is 7319.",
           "What is the magic number of the Zephyr project?", "7319",
           "The magic number of the Zephyr project is"),
    Needle("Lena hides her spare key under the blue flowerpot.",
           "Where does Lena hide her spare key?", "flowerpot", "Lena hides her spare key"),
    Needle("The Orion meeting takes place in room 42B.",
           "In which room does the Orion meeting take place?", "42b",
           "The Orion meeting takes place in room"),
)

_DOC = "\x00SQZ_DOCUMENT\x00"


def _chat_parts(tokenizer, question: str, lead: str = "") -> tuple[list[int], list[int]]:
    """(ids before the document, ids after it) of a one-turn chat: [doc]\\n\\n[question], then the
    assistant header and `lead` (the start of the answer, if any)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{_DOC}\n\n{question} Answer in a few words."}],
        tokenize=False, add_generation_prompt=True) + lead
    head, sep, tail = text.partition(_DOC)
    if not sep:
        raise ValueError("the tokenizer's chat template dropped the document text; cannot split the prompt")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return enc(head), enc(tail)


def _sentence_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """Token indices j where text ids[:j] ends a sentence (0 included: the start of the text)."""
    pieces = [tokenizer.decode([i]) for i in ids] + [" "]
    return [0] + [j for j in range(1, len(ids) + 1)
                  if pieces[j - 1].rstrip().endswith((".", "!", "?")) and pieces[j][:1].isspace()]


def niah_prompt(tokenizer, needle: Needle, context_len: int, depth: float, seed: int = 0,
                prime: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(context_ids [1, <= context_len], user_ids [1, M], needle token position) for one NIAH case.

    Context = chat prefix + essay text (cut after its last whole sentence, so a little shorter than
    `context_len`) with the needle at the sentence boundary nearest to `depth` (0 = start of the
    essay, 1 = end); user input = the question, the assistant header and (prime=True) the
    needle's answer lead.
    """
    import torch

    from ..assets import essay_tokens

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth {depth} must lie in [0, 1]")
    head, tail = _chat_parts(tokenizer, needle.question, needle.lead if prime else "")
    fact = tokenizer.encode(" " + needle.fact, add_special_tokens=False)
    n_essay = context_len - len(head) - len(fact)
    if n_essay < 1:
        raise ValueError(f"context_len={context_len} leaves no room for essay text "
                         f"({len(head)} prefix + {len(fact)} needle tokens)")
    essay = essay_tokens(tokenizer, n_essay, seed=seed)[0].tolist()
    ends = _sentence_ends(tokenizer, essay)
    if len(ends) > 1:
        essay = essay[:ends[-1]]
    at = min(ends, key=lambda j: abs(j - depth * len(essay)))
    ctx = head + essay[:at] + fact + essay[at:]
    return (torch.tensor([ctx], dtype=torch.long), torch.tensor([tail], dtype=torch.long),
            len(head) + at)
