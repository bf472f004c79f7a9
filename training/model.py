"""The T-REX model: a compiler transformer that writes the weights of an executor RNN.

One compiler forward pass turns a batch of problems into a batch of *programs*:
for every row, the complete parameter set of a small GRU executor, flattened
into one vector (see ``ProgramLayout``). The executor then runs each row with
its own weights and emits the answer one token per step.

Generated per program (nothing of these is shared between rows):
    w_ih (3H, E), w_hh (3H, H), b_ih (3H), b_hh (3H)   the GRU cell
    w_out (V, H), b_out (V)                           projection onto the vocabulary
    h0 (H)                                            the initial hidden state
Shared by all programs (part of the executor, not of any program):
    the executor's token embedding (V, E), a plain lookup table.

Why a GRU: its update gate lets a unit hold its value across steps unless the
program says otherwise, which is what a digit counter needs, with three gate
blocks instead of an LSTM's four (a quarter fewer generated weights, and the
compiler's output head is the largest matrix in the model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from training import vocab


@dataclass
class ModelConfig:
    """The model's shape; saved in every checkpoint so export rebuilds it alone."""

    max_digits: int = 10  # longest operand, in characters
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 192
    n_slots: int = 12  # program slots: one per answer place, plus one spare
    hidden: int = 48  # executor hidden size H, a multiple of n_slots
    embed: int = 16  # executor token embedding size E
    vocab_size: int = vocab.VOCAB_SIZE
    max_steps: int = 12  # executor steps per program: 11 answer digits and <end>

    def to_dict(self) -> dict:
        return asdict(self)


class ProgramLayout:
    """Where each generated tensor lies in a program's flat parameter vector."""

    def __init__(self, cfg: ModelConfig):
        H, E, V = cfg.hidden, cfg.embed, cfg.vocab_size
        self.shapes: dict[str, tuple[int, ...]] = {
            "w_ih": (3 * H, E),
            "w_hh": (3 * H, H),
            "b_ih": (3 * H,),
            "b_hh": (3 * H,),
            "w_out": (V, H),
            "b_out": (V,),
            "h0": (H,),
        }
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            self.offsets[name] = (start, start + size)
            start += size
        self.size = start

    def split(self, programs: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, P) flat programs -> named (B, *shape) views."""
        B = programs.shape[0]
        return {
            name: programs[:, a:b].reshape(B, *self.shapes[name])
            for name, (a, b) in self.offsets.items()
        }

    def to_list(self) -> list[dict]:
        return [
            {"name": n, "shape": list(self.shapes[n]), "offset": a, "size": b - a}
            for n, (a, b) in self.offsets.items()
        ]


def place_values(ids: torch.Tensor, n_places: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each character's place value and role, computed from the ids alone.

    The place of a digit is its power of ten within its operand (0 for units),
    so digits that must be added share a place however long each operand is;
    this alignment is what makes long addition learnable. Roles: 0 first
    operand, 1 second operand, 2 '+' and '=', 3 padding.

    ids: (B, T) -> places (B, T), roles (B, T)
    """
    is_digit = ids >= vocab.DIGIT0_ID
    is_digit = is_digit & (ids != vocab.PLUS_ID) & (ids != vocab.EQUALS_ID)
    is_sep = (ids == vocab.PLUS_ID) | (ids == vocab.EQUALS_ID)
    segment = torch.cumsum(is_sep.long(), dim=1) - is_sep.long()  # 0 in a, 1 in b
    first = is_digit & (segment == 0)
    second = is_digit & (segment == 1)
    # digits to the right of each position, within its own operand
    after_first = first.long().sum(1, keepdim=True) - torch.cumsum(first.long(), 1)
    after_second = second.long().sum(1, keepdim=True) - torch.cumsum(second.long(), 1)
    # '+', '=' and padding sit at the far end of the place axis, away from every digit
    places = torch.where(first, after_first, torch.where(second, after_second, n_places - 1))
    roles = torch.where(first, 0, torch.where(second, 1, torch.where(is_sep, 2, 3)))
    return places, roles


class Block(nn.Module):
    """Pre-norm transformer block with an additive attention bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model)
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), bias (B, h, L, L) for padding and relative places -> (B, L, C)."""
        return self.attend(x, bias)[0]

    def attend(self, x, bias, past_k=None, past_v=None):
        """The block over L new positions that may also read cached ones.

        x (B, L, C); bias (B, h, L, Lpast + L); past_k/v (B, h, Lpast, C/h) or None
        -> x (B, L, C), and the k and v of the L new positions (B, h, L, C/h)
        """
        B, L, C = x.shape
        h = self.n_heads

        # attention over the cached keys and the new ones
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q = q.view(B, L, h, C // h).transpose(1, 2)  # (B, h, L, C/h)
        k = k.view(B, L, h, C // h).transpose(1, 2)
        v = v.view(B, L, h, C // h).transpose(1, 2)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)  # (B, h, Lpast+L, C/h)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        att = q @ keys.transpose(-2, -1) * (1.0 / math.sqrt(C // h)) + bias
        y = att.softmax(dim=-1) @ values  # (B, h, L, C/h)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, C))

        # feed-forward
        return x + self.mlp(self.ln2(x)), k, v


class ProgramHead(nn.Module):
    """Writes a program from the compiler's slot outputs.

    The executor's H hidden units are split into ``n_slots`` groups of
    u = H / n_slots units, and slot i writes everything that belongs to its
    group: the rows of w_ih, w_hh, b_ih and b_hh that feed its units (all three
    gates), the columns of w_out that read them, and their part of h0. One
    linear map, shared by all slots, writes each slot's share, plus a learned
    per-slot offset (the part of the program that is the same for every
    problem, such as how control passes from one group to the next). Sharing
    the map means what is learned about writing a digit at one place serves
    every place. b_out is written from the mean of the slots.

    NOTE: the structure (which slot writes which weights) is fixed by this
    head; the executor itself only sees the flat program and knows none of it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden % cfg.n_slots:
            raise ValueError("hidden must be a multiple of n_slots")
        self.cfg = cfg
        self.layout = ProgramLayout(cfg)
        S, H, E, V = cfg.n_slots, cfg.hidden, cfg.embed, cfg.vocab_size
        u = H // S
        self.u = u
        # one slot's share of the program, in this order
        self.parts = {
            "w_ih": (3, u, E),
            "w_hh": (3, u, H),
            "b_ih": (3, u),
            "b_hh": (3, u),
            "w_out": (V, u),
            "h0": (u,),
        }
        self.share = sum(math.prod(s) for s in self.parts.values())
        self.slot_map = nn.Linear(cfg.d_model, self.share)
        self.slot_base = nn.Parameter(torch.empty(S, self.share))
        self.out_bias = nn.Linear(cfg.d_model, V)

        # start from a freshly initialised GRU as the common program
        bound = 1.0 / math.sqrt(H)
        with torch.no_grad():
            self.slot_base.uniform_(-bound, bound)
            self.slot_base[:, -u:] = 0.0  # h0
            self.slot_map.weight.normal_(0.0, 0.1 / math.sqrt(cfg.d_model))
            self.slot_map.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, S, C) slot outputs -> programs (B, P) in ``ProgramLayout`` order."""
        B, S, _ = z.shape
        H, E, V = self.cfg.hidden, self.cfg.embed, self.cfg.vocab_size
        share = self.slot_map(z) + self.slot_base  # (B, S, share)
        parts, start = {}, 0
        for name, shape in self.parts.items():
            size = math.prod(shape)
            parts[name] = share[:, :, start : start + size].reshape(B, S, *shape)
            start += size

        # gather each slot's rows and columns into whole matrices
        w_ih = parts["w_ih"].permute(0, 2, 1, 3, 4).reshape(B, 3 * H, E)  # (B, 3H, E)
        w_hh = parts["w_hh"].permute(0, 2, 1, 3, 4).reshape(B, 3 * H, H)  # (B, 3H, H)
        b_ih = parts["b_ih"].permute(0, 2, 1, 3).reshape(B, 3 * H)  # (B, 3H)
        b_hh = parts["b_hh"].permute(0, 2, 1, 3).reshape(B, 3 * H)
        w_out = parts["w_out"].permute(0, 2, 1, 3).reshape(B, V, H)  # (B, V, H)
        h0 = parts["h0"].reshape(B, H)
        b_out = self.out_bias(z.mean(dim=1))  # (B, V)
        flat = {
            "w_ih": w_ih,
            "w_hh": w_hh,
            "b_ih": b_ih,
            "b_hh": b_hh,
            "w_out": w_out,
            "b_out": b_out,
            "h0": h0,
        }
        return torch.cat([flat[n].reshape(B, -1) for n in self.layout.shapes], dim=1)


class Compiler(nn.Module):
    """Transformer over the problem's characters and ``n_slots`` program slots.

    Slot i stands for the answer's place i; it attends to the characters and to
    the other slots (all attention is bidirectional, one pass). Each layer adds
    a learned bias per head for the difference of place values between query
    and key, so "the digit of the same place" and "the nearest lower place"
    are a fixed offset away whatever the operand lengths: carries are found by
    looking a fixed distance down, not by counting characters.

    The slots' outputs go through ``ProgramHead``, which writes the program.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = ProgramLayout(cfg)
        n_places = max(cfg.max_digits, cfg.n_slots) + 1
        self.n_places = n_places
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.place_emb = nn.Embedding(n_places, cfg.d_model)
        self.role_emb = nn.Embedding(5, cfg.d_model)  # 4 = program slot
        self.slot_emb = nn.Parameter(torch.randn(cfg.n_slots, cfg.d_model) * 0.02)
        self.rel_bias = nn.Parameter(self._initial_bias(cfg, n_places))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = ProgramHead(cfg)

    @staticmethod
    def _initial_bias(cfg: ModelConfig, n_places: int) -> torch.Tensor:
        """Relative-place bias that starts each head looking somewhere useful:
        head 0 at the same place (aligning the operands' digits), head 1 one
        place down and head 2 two places down (where carries come from); any
        further heads start unbiased. Training is free to move all of them."""
        rel = torch.arange(2 * n_places - 1) - (n_places - 1)  # query place - key place
        bias = torch.zeros(cfg.n_layers, cfg.n_heads, rel.numel())
        for head, (offset, slope) in enumerate([(0, 2.0), (1, 2.0), (2, 1.0)][: cfg.n_heads]):
            bias[:, head] = -slope * (rel - offset).abs().float()
        return bias

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) problem characters -> programs (B, P)."""
        cfg = self.cfg
        B, T = ids.shape
        S = cfg.n_slots

        # embed characters by identity, place value and role; slots by index and place
        places, roles = place_values(ids, self.n_places)
        x = self.tok_emb(ids) + self.place_emb(places) + self.role_emb(roles)  # (B, T, C)
        slot_places = torch.arange(S, device=ids.device)
        slots = self.slot_emb + self.place_emb(slot_places) + self.role_emb.weight[4]
        x = torch.cat([x, slots.unsqueeze(0).expand(B, S, cfg.d_model)], dim=1)  # (B, L, C)

        # attention bias: relative place per head, and no attention to padding
        all_places = torch.cat([places, slot_places.unsqueeze(0).expand(B, S)], dim=1)
        rel = all_places.unsqueeze(2) - all_places.unsqueeze(1) + (self.n_places - 1)  # (B, L, L)
        pad = torch.cat(
            [ids == vocab.PAD_ID, torch.zeros(B, S, dtype=torch.bool, device=ids.device)], 1
        )
        pad_bias = torch.zeros(B, 1, 1, T + S, device=ids.device).masked_fill(
            pad.view(B, 1, 1, T + S), -1e9
        )

        for layer, block in enumerate(self.blocks):
            bias = self.rel_bias[layer][:, rel].permute(1, 0, 2, 3) + pad_bias  # (B, h, L, L)
            x = block(x, bias)

        # slots -> one flat program per row
        return self.head(self.ln_f(x[:, T:]))  # (B, P)


class Executor(nn.Module):
    """A GRU cell whose weights come from the program of each row.

    Only the token embedding belongs to the executor itself; every other
    weight is read from ``programs``, so one batch can mix any programs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = ProgramLayout(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed)

    def initial_state(self, programs: torch.Tensor) -> torch.Tensor:
        a, b = self.layout.offsets["h0"]
        return programs[:, a:b]

    def step(
        self, programs: torch.Tensor, h: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for every row.

        programs (B, P), h (B, H), tokens (B,) the previous token
        -> logits (B, V) for the next token, new h (B, H)
        """
        p = self.layout.split(programs)
        x = self.embed(tokens)  # (B, E)
        gi = torch.einsum("bge,be->bg", p["w_ih"], x) + p["b_ih"]  # (B, 3H)
        gh = torch.einsum("bgh,bh->bg", p["w_hh"], h) + p["b_hh"]  # (B, 3H)
        return self._cell(p, gi, gh, h)

    def _cell(self, p, gi, gh, h):
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h  # (B, H)
        logits = torch.einsum("bvh,bh->bv", p["w_out"], h) + p["b_out"]  # (B, V)
        return logits, h

    def forward(self, programs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced run: inputs (B, S) previous tokens -> logits (B, S, V)."""
        p = self.layout.split(programs)
        x = self.embed(inputs)  # (B, S, E)
        gi_all = torch.einsum("bge,bse->bsg", p["w_ih"], x) + p["b_ih"].unsqueeze(1)  # (B, S, 3H)
        h = p["h0"]
        out = []
        for t in range(inputs.shape[1]):
            gh = torch.einsum("bgh,bh->bg", p["w_hh"], h) + p["b_hh"]
            logits, h = self._cell(p, gi_all[:, t], gh, h)
            out.append(logits)
        return torch.stack(out, dim=1)


class TRex(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.compiler = Compiler(cfg)
        self.executor = Executor(cfg)

    def forward(self, ids: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Training pass: one compile, then a teacher-forced executor run."""
        return self.executor(self.compiler(ids), inputs)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_steps: int | None = None):
        """Greedy decoding: one compiler pass per row, then executor steps until
        every row has emitted ``<end>`` or the step limit.

        -> tokens (B, steps), logits (B, steps, V), hidden states (B, steps, H)
        """
        max_steps = max_steps or self.cfg.max_steps
        programs = self.compiler(ids)
        h = self.executor.initial_state(programs)
        tok = torch.full((ids.shape[0],), vocab.START_ID, dtype=torch.long, device=ids.device)
        done = torch.zeros_like(tok, dtype=torch.bool)
        tokens, all_logits, states = [], [], []
        for _ in range(max_steps):
            logits, h = self.executor.step(programs, h, tok)
            tok = logits.argmax(-1)
            tokens.append(tok)
            all_logits.append(logits)
            states.append(h)
            done |= tok == vocab.END_ID
            if bool(done.all()):
                break
        return torch.stack(tokens, 1), torch.stack(all_logits, 1), torch.stack(states, 1)
