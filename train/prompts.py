"""A1111's prompt emphasis syntax: which parts of a prompt are weighted by how much (docs/models.md, "Prompts").

    (word)        weight x 1.1       ((word)) x 1.21, and so on
    [word]        weight / 1.1
    (word:1.5)    weight x 1.5       a number before the closing bracket sets the factor
    \\( \\) \\[ \\] \\\\  the literal character
    BREAK         ends the current 75-token chunk (the rest of the prompt starts a new one)

A bracket left open applies to the end of the prompt; a closing bracket with nothing open is kept as text.
The result is a list of (text, weight) pieces, neighbours of equal weight joined; each piece is tokenized
on its own, as A1111 does.
"""
from __future__ import annotations

import re
from typing import NamedTuple

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
# One syntax element at a time: an escape, a lone backslash, an opening bracket, ":number)" (a weight
# closing a round bracket), a closing bracket, a run of plain text, or a colon that sets no weight.
SYNTAX = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*")


class Piece(NamedTuple):
    text: str
    weight: float
    chunk_break: bool = False  # True: no text; the next piece starts a new chunk


def parse_emphasis(prompt: str) -> list[Piece]:
    """The weighted pieces of `prompt` (an empty prompt is one empty piece of weight 1)."""
    pieces: list[list] = []  # [text, weight, chunk_break], mutable while brackets close
    open_round: list[int] = []  # index in `pieces` where each open bracket started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in SYNTAX.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0, False])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round and _is_number(weight):
            scale_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(BREAK.split(token)):
                if i:
                    pieces.append(["", 1.0, True])
                if part:
                    pieces.append([part, 1.0, False])
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)
    return _join_equal_neighbours(pieces) or [Piece("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join_equal_neighbours(pieces: list[list]) -> list[Piece]:
    joined: list[Piece] = []
    for text, weight, chunk_break in pieces:
        if chunk_break:
            joined.append(Piece("", 1.0, True))
        elif joined and not joined[-1].chunk_break and joined[-1].weight == weight:
            joined[-1] = Piece(joined[-1].text + text, weight)
        else:
            joined.append(Piece(text, weight))
    return joined
