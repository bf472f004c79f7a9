"""The one vocabulary shared by the compiler, the executor and the exported models.

Index  Token     Role
0      <pad>     padding in batched compiler input and in training targets
1      <start>   the executor's input at its first step
2      <end>     the executor emits it after the answer's last digit
3..12  0 .. 9    decimal digits
13     +         separates the operands
14     =         ends the problem

The list is written into every checkpoint and into the export manifest, so the
serving side reads it from there and never imports this module.
"""

PAD, START, END = "<pad>", "<start>", "<end>"
TOKENS: tuple[str, ...] = (PAD, START, END, *"0123456789", "+", "=")
INDEX: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}

PAD_ID, START_ID, END_ID = INDEX[PAD], INDEX[START], INDEX[END]
PLUS_ID, EQUALS_ID = INDEX["+"], INDEX["="]
DIGIT0_ID = INDEX["0"]
VOCAB_SIZE = len(TOKENS)


def encode(text: str) -> list[int]:
    """Character ids of a problem such as ``7669+10132=``."""
    return [INDEX[c] for c in text]


def decode(ids) -> str:
    """The text of emitted ids, stopping at ``<end>`` and skipping control tokens."""
    out = []
    for i in ids:
        i = int(i)
        if i == END_ID:
            break
        if i >= DIGIT0_ID:
            out.append(TOKENS[i])
    return "".join(out)
