"""The token-by-token baseline: a decoder-only transformer that writes the answer
one token per forward pass, for measuring T-REX against.

Same vocabulary, data and held-out set as T-REX, and the same width and depth
class as the T-REX compiler (``BaselineConfig`` mirrors ``ModelConfig``). The
sequence is the problem followed by the answer:

    7669+10132= 1 0 8 7 1 <end>

The answer is written least significant digit first. That is the order in
which a causal model can add (each digit needs only the digits and carry below
it), so it is the strongest token-by-token baseline of this size; the caller
reverses the digits back. Every position carries a place value as in the T-REX
compiler: a problem digit its power of ten, the ``=`` the answer's place 0, the
answer's k-th token place k + 1 (the place it predicts). A per-head bias on the
difference of places lets a position find the two digits it adds.

A key-value cache (``past``) makes each generated token cost one forward pass
over one position; the export writes it as a prefill graph and a decode graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from training import vocab
from training.model import Block, Compiler, place_values


@dataclass
class BaselineConfig:
    """The baseline's shape; saved in its checkpoint."""

    max_digits: int = 10
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 192
    vocab_size: int = vocab.VOCAB_SIZE
    max_steps: int = 12  # answer tokens: 11 digits and <end>
    kind: str = "baseline"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def n_places(self) -> int:
        return max(self.max_digits, self.max_steps) + 1


class Baseline(nn.Module):
    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.cfg = cfg
        n_places = cfg.n_places
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.place_emb = nn.Embedding(n_places, cfg.d_model)
        self.role_emb = nn.Embedding(5, cfg.d_model)  # 4 = answer token
        # the same starting bias as the T-REX compiler: same place, one and two places down
        self.rel_bias = nn.Parameter(Compiler._initial_bias(cfg, n_places))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def positions(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Places and roles of a problem's characters; ``=`` takes the answer's place 0."""
        places, roles = place_values(ids, self.cfg.n_places)
        places = torch.where(ids == vocab.EQUALS_ID, 0, places)
        return places, roles

    def run(self, x, q_places, k_places, key_ok, causal, past=None):
        """The transformer over embedded positions.

        x (B, L, C); q_places (B, L); k_places (B, K) and key_ok (B, K) for all
        K = Lpast + L keys; causal (L, K) bool; past: per layer (k, v) or None.
        -> hidden (B, L, C), present: per layer (k, v) of the L new positions
        """
        n = self.cfg.n_places
        rel = q_places.unsqueeze(2) - k_places.unsqueeze(1) + (n - 1)  # (B, L, K)
        allowed = causal.unsqueeze(0) & key_ok.unsqueeze(1)  # (B, L, K)
        mask = torch.zeros(allowed.shape, device=x.device).masked_fill(~allowed, -1e9)
        present = []
        for layer, block in enumerate(self.blocks):
            bias = self.rel_bias[layer][:, rel].permute(1, 0, 2, 3) + mask.unsqueeze(1)
            pk, pv = past[layer] if past is not None else (None, None)
            x, k, v = block.attend(x, bias, pk, pv)
            present.append((k, v))
        return self.ln_f(x), present

    def forward(self, ids: torch.Tensor, answer_in: torch.Tensor) -> torch.Tensor:
        """Training pass over problem and answer together.

        ids (B, T) problems, right-padded; answer_in (B, S) answer tokens so far
        (reversed digits, padded) -> logits (B, S + 1, V): position 0 is the
        prediction made at ``=``, position k + 1 the one made after answer token k.
        """
        B, T = ids.shape
        S = answer_in.shape[1]
        places, roles = self.positions(ids)
        x_p = self.tok_emb(ids) + self.place_emb(places) + self.role_emb(roles)
        steps = torch.arange(1, S + 1, device=ids.device).expand(B, S)
        x_a = self.tok_emb(answer_in) + self.place_emb(steps) + self.role_emb.weight[4]
        x = torch.cat([x_p, x_a], dim=1)  # (B, T + S, C)
        all_places = torch.cat([places, steps], dim=1)
        key_ok = torch.cat([ids != vocab.PAD_ID, answer_in != vocab.PAD_ID], dim=1)
        causal = torch.ones(T + S, T + S, dtype=torch.bool, device=ids.device).tril()
        hidden, _ = self.run(x, all_places, all_places, key_ok, causal)
        # the '=' of each row, then the answer positions
        eq = (ids != vocab.PAD_ID).sum(1) - 1  # (B,)
        at_eq = hidden[torch.arange(B), eq].unsqueeze(1)  # (B, 1, C)
        return self.lm_head(torch.cat([at_eq, hidden[:, T:]], dim=1))

    def prefill(self, ids: torch.Tensor):
        """The problem in one pass: -> logits at ``=`` (B, V), keys and values
        (n_layers, B, h, T, C/h) each, key places (B, T), key mask (B, T)."""
        B, T = ids.shape
        places, roles = self.positions(ids)
        x = self.tok_emb(ids) + self.place_emb(places) + self.role_emb(roles)
        key_ok = ids != vocab.PAD_ID
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        hidden, present = self.run(x, places, places, key_ok, causal)
        eq = key_ok.long().sum(1) - 1
        logits = self.lm_head(hidden[torch.arange(B), eq])
        k = torch.stack([p[0] for p in present])
        v = torch.stack([p[1] for p in present])
        return logits, k, v, places, key_ok

    def decode(self, tokens, steps, past_k, past_v, past_places, past_ok):
        """One new answer token per row: tokens (B,), steps (B,) its index k + 1;
        past_k/v (n_layers, B, h, K, C/h), past_places (B, K), past_ok (B, K).

        -> logits (B, V), the new position's k and v (n_layers, B, h, 1, C/h)
        """
        B = tokens.shape[0]
        x = self.tok_emb(tokens) + self.place_emb(steps) + self.role_emb.weight[4]
        x = x.unsqueeze(1)  # (B, 1, C)
        k_places = torch.cat([past_places, steps.unsqueeze(1)], dim=1)  # (B, K + 1)
        key_ok = torch.cat([past_ok, torch.ones(B, 1, dtype=torch.bool, device=x.device)], 1)
        causal = torch.ones(1, key_ok.shape[1], dtype=torch.bool, device=x.device)
        past = [(past_k[i], past_v[i]) for i in range(self.cfg.n_layers)]
        hidden, present = self.run(x, steps.unsqueeze(1), k_places, key_ok, causal, past)
        k = torch.stack([p[0] for p in present])
        v = torch.stack([p[1] for p in present])
        return self.lm_head(hidden[:, 0]), k, v

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_steps: int | None = None):
        """Greedy answers with the cache: one forward pass per emitted token.

        -> tokens (B, steps) in emission order (least significant digit first)
        """
        max_steps = max_steps or self.cfg.max_steps
        B = ids.shape[0]
        logits, k, v, places, ok = self.prefill(ids)
        tok = logits.argmax(-1)
        out = [tok]
        done = tok == vocab.END_ID
        for step in range(1, max_steps):
            if bool(done.all()):
                break
            steps = torch.full((B,), step, dtype=torch.long, device=ids.device)
            logits, nk, nv = self.decode(tok, steps, k, v, places, ok)
            k, v = torch.cat([k, nk], dim=3), torch.cat([v, nv], dim=3)
            places = torch.cat([places, steps.unsqueeze(1)], dim=1)
            ok = torch.cat([ok, torch.ones(B, 1, dtype=torch.bool, device=ids.device)], 1)
            tok = logits.argmax(-1)
            out.append(tok)
            done |= tok == vocab.END_ID
        return torch.stack(out, 1)


def reversed_answer(answer: str) -> str:
    """The baseline's emission order: least significant digit first."""
    return answer[::-1]
