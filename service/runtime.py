"""ONNX Runtime execution of an exported model: compile problems into pool rows, then step any
mix of pool rows, one greedy token per call. Two kinds of model, named by the manifest's
``kind``, behind the same calls:

* ``"trex"`` (the default when a manifest has no kind): ``compile`` runs the compiler, which
  writes each problem's executor program into its row; ``step`` runs one executor step.
* ``"baseline"``: ``compile`` runs the baseline transformer's prefill over the problem, which
  writes the row's key-value cache and already emits the answer's first token (``compile``
  returns those); ``step`` runs one decode pass per row, appending to its cache. Its answers
  come least significant digit first; ``decode`` puts the digits back in written order.

    python -m service.runtime --model-dir models/onnx 7669+10132= 1+2=     # answers + providers
    python -m service.runtime --model-dir models/onnx-baseline 7669+10132=

Loading reads ``manifest.json`` (written by ``trex-export``), checks the SHA-256 of every graph
it lists and the graphs' inputs and outputs against it, and refuses anything missing, corrupt
or mismatched with ``ModelLoadError``, whose message names the file.

Providers: ``"auto"`` asks for CUDAExecutionProvider and falls back to the CPU one, ``"cuda"``
insists on CUDA, ``"cpu"`` uses the CPU. ``Runtime.providers`` says what each session got.

The T-REX pool: ``max_rows`` rows, each holding one compiled program (P floats, kept split into
its parts w_ih, w_hh, ... so that no step has to slice it) and its executor hidden state
(H floats). ``compile`` writes rows, ``step`` advances any subset of rows by one token; rows
are independent, so a caller can add or retire rows between any two steps (continuous
batching). Two pool implementations, chosen by ``pool=``:

* ``"host"`` (the default on CPU): numpy arrays; ``executor_split.onnx`` runs on the stepped
  rows, which are zero-copy views when the rows are consecutive (``rows[i+1] == rows[i]+1``)
  and gathered copies otherwise. Keeping active rows in one consecutive block is cheaper:
  export/DESIGN.md has the figures.
* ``"device"`` (the default on CUDA): the pool lives in OrtValues on the sessions' device,
  and ``pool_write.onnx`` / ``executor_pool.onnx`` scatter and gather rows inside the graphs
  (bound with IOBinding), so programs and hidden states never leave the device; only the
  emitted token ids (and logits, when asked for) are copied back. It also runs on the CPU,
  which is how its logic is tested without a GPU.

The baseline pool (host only): per row a key-value cache of ``max_len`` positions (the longest
problem plus ``max_steps - 1`` fed-back tokens), position-major (rows, positions, layers,
heads, head_dim) so that consecutive rows are one block read in place, with each key's place
and a key mask; decode reads the whole cache of each stepped row, masked past its length, and
its new key and value are written at the row's next position.

Calls are serialised by a lock; a ``Runtime`` may be shared between threads. A call that
raises leaves the pool as it was: hidden states are written back (host pool) or the buffers
swapped (device pool) only after the graph ran. Design notes and timings: export/DESIGN.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDERS = ("auto", "cuda", "cpu")
POOLS = ("auto", "host", "device")
KINDS = ("trex", "baseline")
PAD, START, END = "<pad>", "<start>", "<end>"
# the order in which a model writes an answer's digits (manifest "answer_order")
MOST_SIGNIFICANT_FIRST = "most_significant_first"
LEAST_SIGNIFICANT_FIRST = "least_significant_first"

# the graphs every manifest of a kind must list, and which pool uses which
GRAPHS = ("compiler", "executor", "executor_split", "pool_write", "executor_pool")
BASELINE_GRAPHS = ("prefill", "decode")
GRAPHS_BY_KIND = {"trex": GRAPHS, "baseline": BASELINE_GRAPHS}
_POOL_GRAPHS = {
    ("trex", "host"): ("compiler", "executor_split"),
    ("trex", "device"): ("compiler", "pool_write", "executor_pool"),
    ("baseline", "host"): ("prefill", "decode"),
}
# graphs by the phase they run: "compiler" (compile phase), "executor" (execute phase)
_ROLE = {
    "executor_split": "executor",
    "executor_pool": "executor",
    "prefill": "compiler",
    "decode": "executor",
}
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "bool": "tensor(bool)"}
# entries a manifest of each kind must have besides the common ones
KIND_KEYS = {"trex": ("program",), "baseline": ("cache",)}
_CACHE_KEYS = ("n_layers", "n_heads", "head_dim", "n_places", "max_problem_len", "max_len")


class ModelLoadError(RuntimeError):
    """An exported model that cannot be served: a file is missing, corrupt or does not match
    its manifest, or the requested provider is not available."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_kind(manifest: dict) -> str:
    """The model kind a manifest describes; manifests written before kinds existed are T-REX."""
    return manifest.get("kind", "trex")


def answer_order(manifest: dict) -> str:
    """The order of an answer's digits as the model emits them: the manifest's answer_order,
    else its kind's (T-REX most significant first, the baseline least significant first)."""
    default = LEAST_SIGNIFICANT_FIRST if manifest_kind(manifest) == "baseline" else None
    return manifest.get("answer_order", default or MOST_SIGNIFICANT_FIRST)


def read_manifest(model_dir: str | Path) -> dict:
    """The manifest of an export folder, with its structure checked."""
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path}: missing; is {model_dir} an export folder of trex-export?"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable or not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelLoadError(
            f"{path}: manifest format {got!r}, this runtime reads {MANIFEST_FORMAT}"
        )
    kind = manifest_kind(manifest)
    if kind not in KINDS:
        raise ModelLoadError(f"{path}: model kind {kind!r}; this runtime serves {KINDS}")
    for key in ("model_version", "vocab", "config", "graphs") + KIND_KEYS[kind]:
        if key not in manifest:
            raise ModelLoadError(f"{path}: no {key!r} entry")
    missing = [g for g in GRAPHS_BY_KIND[kind] if g not in manifest["graphs"]]
    if missing:
        raise ModelLoadError(f"{path}: no entry for graph(s) {', '.join(missing)}")
    vocab = manifest["vocab"]
    for tok in (PAD, START, END):
        if tok not in vocab:
            raise ModelLoadError(f"{path}: vocabulary lacks {tok!r}")
    order = answer_order(manifest)
    if order not in (MOST_SIGNIFICANT_FIRST, LEAST_SIGNIFICANT_FIRST):
        raise ModelLoadError(f"{path}: answer_order {order!r} is neither of the two known")
    if kind == "baseline":
        cache = manifest["cache"]
        bad = [k for k in _CACHE_KEYS if not (isinstance(cache.get(k), int) and cache[k] >= 1)]
        if bad:
            raise ModelLoadError(f"{path}: cache entry lacks positive integer(s) {bad}")
        if cache["max_len"] < cache["max_problem_len"] + int(manifest["config"]["max_steps"]) - 1:
            raise ModelLoadError(f"{path}: cache max_len too short for max_steps tokens")
        return manifest
    program = manifest["program"]
    size = sum(p["size"] for p in program["layout"])
    names = {p["name"] for p in program["layout"]}
    if size != program["size"] or "h0" not in names:
        raise ModelLoadError(f"{path}: program layout does not add up to its size {size}")
    if not set(program.get("step_parts", ["?"])) <= names:
        raise ModelLoadError(f"{path}: step_parts {program.get('step_parts')} not in the layout")
    if "executor_embedding" in manifest:
        emb = manifest["executor_embedding"]
        want = [len(vocab), manifest["config"].get("embed")]
        try:
            values = np.asarray(emb["values"], np.float32)
            ok = emb["shape"] == want and list(values.shape) == want
        except (TypeError, KeyError, ValueError):  # not a dict, or ragged or non-numeric values
            ok = False
        if not ok:
            raise ModelLoadError(f"{path}: executor_embedding is not a [vocab, embed] {want} table")
    return manifest


class _HostPool:
    """Programs, split into their parts, and hidden states in numpy arrays;
    ``executor_split.onnx`` runs on the stepped rows."""

    kind = "host"

    def __init__(self, rt: Runtime, sessions: dict[str, ort.InferenceSession]):
        self.compiler, self.executor = sessions["compiler"], sessions["executor_split"]
        self.layout, self.step_parts, self.h0 = rt._layout, rt._step_parts, rt._h0
        N = rt.max_rows
        self.parts = {
            n: np.zeros((N, *shape), np.float32) for n, (_, _, shape) in self.layout.items()
        }
        self.hidden = np.zeros((N, rt.hidden_size), np.float32)

    def compile(self, ids: np.ndarray, rows: np.ndarray) -> None:
        (programs,) = self.compiler.run(["programs"], {"ids": ids})  # (B, P)
        B = len(rows)
        for name, (a, b, shape) in self.layout.items():
            self.parts[name][rows] = programs[:, a:b].reshape(B, *shape)  # (B, *shape)
        a, b = self.h0
        self.hidden[rows] = programs[:, a:b]  # (B, H): each program's initial state

    def step(self, rows: np.ndarray, tokens: np.ndarray, want_logits: bool):
        sel = _as_slice(rows)
        sel = rows if sel is None else sel  # a slice gives views, rows gathered copies
        feed = {n: self.parts[n][sel] for n in self.step_parts}
        feed.update(hidden=self.hidden[sel], tokens=tokens)
        names = ["next_tokens", "next_hidden"] + (["logits"] if want_logits else [])
        out = self.executor.run(names, feed)
        self.hidden[sel] = out[1]  # (B, H) back into the pool
        return out[0], (out[2] if want_logits else None)

    def read_program(self, row: int) -> np.ndarray:
        return np.concatenate([self.parts[n][row].ravel() for n in self.layout])

    def read_hidden(self, row: int) -> np.ndarray:
        return self.hidden[row].copy()


class _DevicePool:
    """Programs, split into their parts, and hidden states in OrtValues on the sessions'
    device; ``pool_write.onnx`` and ``executor_pool.onnx`` scatter and gather rows.

    NOTE: an ONNX graph cannot update an input in place, so each buffer has a twin: a graph
    reads the live one and writes the whole other one, then they swap. That costs a copy of
    the pool per call (N x P floats per compile, N x H per step), microseconds in device
    memory; in exchange no program or hidden state crosses to the host.
    """

    kind = "device"

    def __init__(self, rt: Runtime, sessions: dict[str, ort.InferenceSession]):
        self.compiler = sessions["compiler"]
        self.writer = sessions["pool_write"]
        self.executor = sessions["executor_pool"]
        self.layout, self.step_parts = rt._layout, rt._step_parts
        self.device, self.device_id = rt.device, rt.device_id
        N = rt.max_rows
        shapes = {n: (N, *shape) for n, (_, _, shape) in self.layout.items()}
        shapes["hidden"] = (N, rt.hidden_size)
        # on the CPU an OrtValue shares the numpy array's memory: keep the arrays alive
        self._host = {n: [np.zeros(s, np.float32) for _ in range(2)] for n, s in shapes.items()}
        self.buf = {
            n: [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in pair]
            for n, pair in self._host.items()
        }
        self.p_live = self.h_live = 0  # live twin of the program parts, of the hidden states

    def compile(self, ids: np.ndarray, rows: np.ndarray) -> None:
        c = self.compiler.io_binding()
        c.bind_cpu_input("ids", ids)
        c.bind_output("programs", self.device, self.device_id)  # (B, P) stays on the device
        self.compiler.run_with_iobinding(c)
        programs = c.get_outputs()[0]

        w = self.writer.io_binding()
        p, h = self.p_live, self.h_live
        for n in self.layout:
            w.bind_ortvalue_input(f"pool_{n}", self.buf[n][p])
        w.bind_ortvalue_input("pool_hidden", self.buf["hidden"][h])
        w.bind_cpu_input("rows", rows)
        w.bind_ortvalue_input("programs", programs)
        for n in self.layout:
            w.bind_ortvalue_output(f"pool_{n}_out", self.buf[n][1 - p])
        w.bind_ortvalue_output("pool_hidden_out", self.buf["hidden"][1 - h])
        self.writer.run_with_iobinding(w)
        self.p_live, self.h_live = 1 - p, 1 - h

    def step(self, rows: np.ndarray, tokens: np.ndarray, want_logits: bool):
        b = self.executor.io_binding()
        for n in self.step_parts:
            b.bind_ortvalue_input(f"pool_{n}", self.buf[n][self.p_live])
        b.bind_ortvalue_input("pool_hidden", self.buf["hidden"][self.h_live])
        b.bind_cpu_input("rows", rows)
        b.bind_cpu_input("tokens", tokens)
        b.bind_output("next_tokens", "cpu")  # (B,) the only output that must reach the host
        b.bind_ortvalue_output("pool_hidden_out", self.buf["hidden"][1 - self.h_live])
        b.bind_output("logits", "cpu" if want_logits else self.device, self.device_id)
        self.executor.run_with_iobinding(b)
        self.h_live = 1 - self.h_live
        out = b.get_outputs()  # in the order bound above
        return out[0].numpy(), (out[2].numpy() if want_logits else None)

    # NOTE: an OrtValue has no row view, so each read copies whole pool buffers to the host
    # (N x P floats for a program, N x H for a hidden state); for inspection, not the hot path

    def read_program(self, row: int) -> np.ndarray:
        parts = [self.buf[n][self.p_live].numpy()[row].ravel() for n in self.layout]
        return np.concatenate(parts)

    def read_hidden(self, row: int) -> np.ndarray:
        return self.buf["hidden"][self.h_live].numpy()[row].copy()


class _BaselineHostPool:
    """The baseline's key-value caches in numpy arrays, one cache row per pool row;
    ``prefill.onnx`` fills rows, ``decode.onnx`` runs on the stepped rows' whole caches.

    Per row: keys and values (max_len, n_layers, h, dh), each key's place and a key mask
    (max_len,), the positions filled (``length``) and the answer tokens emitted so far
    (``emitted``, the step index of the next token fed back).
    """

    kind = "host"

    def __init__(self, rt: Runtime, sessions: dict[str, ort.InferenceSession]):
        self.prefill, self.decoder = sessions["prefill"], sessions["decode"]
        c = rt.cache
        N, L = rt.max_rows, c["max_len"]
        self.max_len, self.max_steps = L, rt.max_steps
        shape = (N, L, c["n_layers"], c["n_heads"], c["head_dim"])
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        # unused positions keep place 0, a valid index for the graphs' place-bias lookup
        self.places = np.zeros((N, L), np.int64)
        self.ok = np.zeros((N, L), np.bool_)
        self.length = np.zeros(N, np.int64)
        self.emitted = np.zeros(N, np.int64)

    def compile(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        # k, v (B, T, n_layers, h, dh); places, key_ok (B, T); first tokens (B,)
        tokens, k, v, places, key_ok = self.prefill.run(
            ["next_tokens", "k", "v", "places", "key_ok"], {"ids": ids}
        )
        T = ids.shape[1]
        self.k[rows, :T] = k
        self.v[rows, :T] = v
        self.places[rows, :T] = places
        self.places[rows, T:] = 0
        self.ok[rows, :T] = key_ok
        self.ok[rows, T:] = False  # stale keys of the row's last problem are masked out
        self.length[rows] = T
        self.emitted[rows] = 1
        return tokens

    def step(self, rows: np.ndarray, tokens: np.ndarray, want_logits: bool):
        done = rows[self.emitted[rows] >= self.max_steps]
        if len(done):
            raise ValueError(
                f"rows {done.tolist()} have emitted max_steps={self.max_steps} tokens, the most "
                "the baseline's place embeddings and key-value cache allow"
            )
        sel = _as_slice(rows)
        sel = rows if sel is None else sel  # a slice gives views, rows gathered copies
        steps = self.emitted[rows]
        feed = {
            "tokens": tokens,
            "steps": steps,
            "past_k": self.k[sel],  # (B, max_len, n_layers, h, dh)
            "past_v": self.v[sel],
            "past_places": self.places[sel],  # (B, max_len)
            "past_ok": self.ok[sel],
        }
        names = ["next_tokens", "k", "v"] + (["logits"] if want_logits else [])
        out = self.decoder.run(names, feed)
        pos = self.length[rows]
        self.k[rows, pos] = out[1]  # (B, n_layers, h, dh), each at its row's next position
        self.v[rows, pos] = out[2]
        self.places[rows, pos] = steps
        self.ok[rows, pos] = True
        self.length[rows] += 1
        self.emitted[rows] += 1
        return out[0], (out[3] if want_logits else None)

    def read(self, row: int) -> dict[str, np.ndarray]:
        n = int(self.length[row])
        return {
            "k": self.k[row, :n].copy(),
            "v": self.v[row, :n].copy(),
            "places": self.places[row, :n].copy(),
            "key_ok": self.ok[row, :n].copy(),
            "emitted": int(self.emitted[row]),
        }


def _as_slice(rows: np.ndarray) -> slice | None:
    """The slice equal to ``rows`` when they are consecutive and ascending, else None."""
    if len(rows) and (len(rows) == 1 or bool(np.all(np.diff(rows) == 1))):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return None


class Runtime:
    """An exported model in ONNX Runtime, T-REX or the baseline (``kind``), with a pool of
    ``max_rows`` rows.

    Typical use by a scheduler: ``ids = rt.encode(texts)``; ``first = rt.compile(ids, rows)``;
    then ``tokens = rt.step(rows, prev)`` until a row emits ``rt.end_id``, where ``prev`` is
    each row's last token: ``rt.start_id`` at first for T-REX (``first`` is None), the token
    in ``first`` for the baseline, whose prefill emits the first answer token. Any rows may be
    stepped together, whenever they were compiled. ``kind``, when given, refuses an export of
    another kind.
    """

    def __init__(
        self,
        model_dir: str | Path,
        provider: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        max_rows: int = 256,
        pool: str = "auto",
        device_id: int = 0,
        kind: str | None = None,
    ):
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, not {pool!r}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        if intra_op_threads < 0 or inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0: onnxruntime's default)")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        m = self.manifest
        self.kind: str = manifest_kind(m)
        if kind is not None and kind != self.kind:
            raise ModelLoadError(
                f"{self.model_dir / MANIFEST}: a {self.kind} model, but {kind} was asked for"
            )
        if self.kind == "baseline" and pool == "device":
            raise ValueError("the baseline has only a host pool (pool='host' or 'auto')")
        self.answer_order: str = answer_order(m)
        self.model_version: str = m["model_version"]
        self.vocab: list[str] = list(m["vocab"])
        self.pad_id, self.start_id, self.end_id = (self.vocab.index(t) for t in (PAD, START, END))
        self._index = {t: i for i, t in enumerate(self.vocab)}
        cfg = m["config"]
        self.max_digits: int = int(cfg["max_digits"])
        self.max_steps: int = int(cfg["max_steps"])
        # T-REX: program and executor sizes; the baseline: its key-value cache's sizes
        self.hidden_size: int | None = None
        self.program_size: int | None = None
        # T-REX: the flat program's parts (name, shape, offset, size), and the executor's
        # token embedding (V, E) that every program shares, so that a program read from the
        # pool can be replayed; None from an export whose manifest predates it
        self.program_layout: list[dict] | None = None
        self.executor_embedding: np.ndarray | None = None
        self.cache: dict[str, int] | None = None
        if self.kind == "trex":
            self.hidden_size = int(cfg["hidden"])
            self.program_size = int(m["program"]["size"])
            # name -> (start, end, shape) of each part of a flat program
            self._layout = {
                p["name"]: (p["offset"], p["offset"] + p["size"], tuple(p["shape"]))
                for p in m["program"]["layout"]
            }
            self._h0 = self._layout["h0"][:2]
            self.program_layout = [dict(p) for p in m["program"]["layout"]]
            if "executor_embedding" in m:
                emb = m["executor_embedding"]
                self.executor_embedding = np.asarray(emb["values"], np.float32).reshape(
                    emb["shape"]
                )
            self._step_parts: list[str] = list(m["program"]["step_parts"])
        else:
            self.cache = {k: int(m["cache"][k]) for k in _CACHE_KEYS}
        self.max_rows = max_rows
        self.device_id = device_id
        self._threads = (intra_op_threads, inter_op_threads)
        self._lock = threading.Lock()

        self._check_files()
        sessions, self.pool_kind = self._open_sessions(provider, pool)
        # by role: "compiler", "executor" (whichever graph steps), and "pool_write" on a device pool
        self.graphs: dict[str, str] = {_ROLE.get(k, k): m["graphs"][k]["file"] for k in sessions}
        self.providers: dict[str, str] = {
            _ROLE.get(k, k): s.get_providers()[0] for k, s in sessions.items()
        }
        self.device = "cuda" if self.providers["compiler"] == CUDA else "cpu"
        if self.kind == "baseline":
            self._pool = _BaselineHostPool(self, sessions)
        else:
            self._pool = (_DevicePool if self.pool_kind == "device" else _HostPool)(self, sessions)
        log.info(
            "%s model %s from %s: providers %s, %s pool of %d rows",
            self.kind,
            self.model_version,
            self.model_dir,
            self.providers,
            self.pool_kind,
            max_rows,
        )

    # ---- loading ---------------------------------------------------------------------------

    def _check_files(self) -> None:
        """Every graph of the manifest exists and has the SHA-256 written there."""
        for name in GRAPHS_BY_KIND[self.kind]:
            entry = self.manifest["graphs"][name]
            path = self.model_dir / entry["file"]
            if not path.is_file():
                raise ModelLoadError(f"{path}: missing (listed in {MANIFEST} as the {name} graph)")
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise ModelLoadError(
                    f"{path}: SHA-256 {digest[:16]}... does not match {MANIFEST} "
                    f"({entry['sha256'][:16]}...); the file is corrupt or from another export"
                )

    def _open_sessions(
        self, provider: str, pool: str
    ) -> tuple[dict[str, ort.InferenceSession], str]:
        """Sessions for the graphs the pool needs, all on CUDA when asked for and available,
        else all on the CPU; and the pool kind."""
        use_cuda = provider in ("auto", "cuda")
        if use_cuda and CUDA not in ort.get_available_providers():
            if provider == "cuda":
                raise ModelLoadError(
                    f"{self.model_dir}: {CUDA} requested, but this onnxruntime offers only "
                    f"{ort.get_available_providers()}"
                )
            log.info("%s not in this onnxruntime build; using %s", CUDA, CPU)
            use_cuda = False
        has_device_pool = (self.kind, "device") in _POOL_GRAPHS
        kind = pool if pool != "auto" else ("device" if use_cuda and has_device_pool else "host")
        sessions: dict[str, ort.InferenceSession] = {}
        for name in _POOL_GRAPHS[self.kind, kind]:
            sessions[name] = self._session(name, use_cuda)
            got = sessions[name].get_providers()[0]
            if use_cuda and got != CUDA:
                file = self.manifest["graphs"][name]["file"]
                if provider == "cuda":
                    raise ModelLoadError(
                        f"{self.model_dir / file}: {CUDA} requested, but the session got {got} "
                        "(onnxruntime's log above says why: driver, CUDA or cuDNN libraries)"
                    )
                log.warning("%s unavailable for %s, falling back to %s", CUDA, file, CPU)
                kind = pool if pool != "auto" else "host"
                # every session on one device: reopen any made on CUDA
                return {n: self._session(n, False) for n in _POOL_GRAPHS[self.kind, kind]}, kind
        if use_cuda and kind == "host":
            # TODO: a device pool for the baseline's key-value caches, as T-REX has for programs
            log.warning(
                "host pool on CUDA: %s cross to the device every step",
                "programs and hidden states" if self.kind == "trex" else "key-value caches",
            )
        return sessions, kind

    def _session(self, name: str, use_cuda: bool) -> ort.InferenceSession:
        entry = self.manifest["graphs"][name]
        path = self.model_dir / entry["file"]
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self._threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [(CUDA, {"device_id": self.device_id}), CPU] if use_cuda else [CPU]
        try:
            sess = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises several of its own types
            raise ModelLoadError(f"{path}: onnxruntime cannot load it ({e})") from e
        self._check_signature(path, sess, entry)
        return sess

    def _check_signature(self, path: Path, sess: ort.InferenceSession, entry: dict) -> None:
        """The graph's inputs and outputs are the manifest's: names, types, fixed sizes."""
        for kind, args in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
            want = entry[kind]
            got_names = [a.name for a in args]
            if got_names != [w["name"] for w in want]:
                raise ModelLoadError(
                    f"{path}: {kind} {got_names} differ from {MANIFEST}'s "
                    f"{[w['name'] for w in want]}"
                )
            for a, w in zip(args, want):
                fixed = [d if isinstance(d, int) else None for d in a.shape]
                want_fixed = [d if isinstance(d, int) else None for d in w["shape"]]
                if a.type != _ORT_TYPES[w["dtype"]] or fixed != want_fixed:
                    raise ModelLoadError(
                        f"{path}: {a.name} is {a.type} {a.shape}, {MANIFEST} says "
                        f"{w['dtype']} {w['shape']}"
                    )

    # ---- API -------------------------------------------------------------------------------

    def encode(self, problems: Sequence[str]) -> np.ndarray:
        """(B, T) int64 compiler input, right-padded with ``<pad>``."""
        if not problems:
            raise ValueError("no problems to encode")
        width = max(len(p) for p in problems)
        ids = np.full((len(problems), width), self.pad_id, dtype=np.int64)
        for i, text in enumerate(problems):
            try:
                ids[i, : len(text)] = [self._index[c] for c in text]
            except KeyError as e:
                raise ValueError(
                    f"problem {i} {text!r}: character {e.args[0]!r} not in the vocabulary"
                ) from None
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        """The answer text of emitted ids: up to ``<end>``, control tokens left out, digits in
        written order (a model that emits the least significant digit first has its digits
        reversed here)."""
        out = []
        for t in tokens:
            t = int(t)
            if t == self.end_id:
                break
            if t not in (self.pad_id, self.start_id):
                out.append(self.vocab[t])
        if self.answer_order == LEAST_SIGNIFICANT_FIRST:
            out.reverse()
        return "".join(out)

    def compile(self, ids: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """The compile phase for ``ids`` (B, T), row i into pool row ``rows[i]``, replacing
        what was there.

        T-REX: one compiler pass writes each program and initial hidden state; -> None.
        The baseline: one prefill pass writes each key-value cache and emits each row's first
        answer token; -> those tokens (B,) int64, which the first ``step`` is given back.
        """
        ids = np.ascontiguousarray(ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype != np.int64:
            raise ValueError(f"ids must be a (batch, seq) int64 array, got {ids.dtype} {ids.shape}")
        rows = self._rows(rows)
        if len(rows) != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} problems but {len(rows)} rows")
        if ids.min() < 0 or ids.max() >= len(self.vocab):
            raise ValueError(f"ids out of the vocabulary's range 0..{len(self.vocab) - 1}")
        if self.cache is not None and ids.shape[1] > self.cache["max_problem_len"]:
            raise ValueError(
                f"problems of {ids.shape[1]} characters; the baseline's key-value cache holds "
                f"problems of at most {self.cache['max_problem_len']}"
            )
        if len(rows) == 0:
            return None if self.kind == "trex" else np.zeros(0, np.int64)
        with self._lock:
            return self._pool.compile(ids, rows)

    def step(self, rows: Sequence[int] | np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """One execute step for pool rows ``rows`` (an executor step, or a decode pass), given
        the token each emitted last (``start_id`` at a T-REX row's first step, the token
        ``compile`` returned at a baseline row's): their next tokens, (len(rows),) int64 on
        the host."""
        return self._step(rows, tokens, False)[0]

    def step_logits(
        self, rows: Sequence[int] | np.ndarray, tokens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``step``, also returning the logits (len(rows), V) (copied to the host)."""
        return self._step(rows, tokens, True)

    def _step(self, rows, tokens, want_logits: bool):
        rows = self._rows(rows)
        tokens = np.ascontiguousarray(tokens)
        if tokens.shape != rows.shape or tokens.dtype != np.int64:
            raise ValueError(
                f"tokens must be int64 of shape {rows.shape}, got {tokens.dtype} {tokens.shape}"
            )
        if len(rows) == 0:
            return tokens.copy(), np.zeros((0, len(self.vocab)), np.float32)
        if tokens.min() < 0 or tokens.max() >= len(self.vocab):
            raise ValueError(f"tokens out of the vocabulary's range 0..{len(self.vocab) - 1}")
        with self._lock:
            return self._pool.step(rows, tokens, want_logits)

    def read_program(self, row: int) -> np.ndarray:
        """Host copy of pool row ``row``'s program (P,) (T-REX)."""
        self._need("trex", "programs")
        with self._lock:
            return self._pool.read_program(self._row(row))

    def read_hidden(self, row: int) -> np.ndarray:
        """Host copy of pool row ``row``'s hidden state (H,) (T-REX)."""
        self._need("trex", "hidden states")
        with self._lock:
            return self._pool.read_hidden(self._row(row))

    def read_cache(self, row: int) -> dict[str, np.ndarray | int]:
        """Host copy of pool row ``row``'s key-value cache (the baseline), its filled
        positions only: k, v (n, n_layers, h, dh), places, key_ok (n,), and ``emitted``, the
        answer tokens the row has emitted."""
        self._need("baseline", "key-value caches")
        with self._lock:
            return self._pool.read(self._row(row))

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ValueError(f"a {self.kind} model's pool holds no {what}")

    def generate(self, ids: np.ndarray, max_steps: int | None = None) -> np.ndarray:
        """Greedy decoding of every row of ``ids`` (B, T): (B, steps) int64 token ids; a row
        that emitted ``<end>`` is padded with ``<end>`` and no longer stepped.

        NOTE: uses pool rows from 0 up, in chunks of ``max_rows``; not to be mixed with a
        scheduler working on the same Runtime.
        """
        max_steps = max_steps or self.max_steps
        if self.kind == "baseline" and max_steps > self.max_steps:
            raise ValueError(f"the baseline writes at most max_steps={self.max_steps} tokens")
        out = np.full((ids.shape[0], max_steps), self.end_id, dtype=np.int64)
        used = 0
        for start in range(0, ids.shape[0], self.max_rows):
            chunk = ids[start : start + self.max_rows]
            rows = np.arange(len(chunk), dtype=np.int64)
            first = self.compile(chunk, rows)
            if first is None:  # T-REX: the executor writes every token
                t0, tokens = 0, np.full(len(chunk), self.start_id, dtype=np.int64)
            else:  # the baseline: the prefill wrote the first
                t0, tokens = 1, first
                out[start + rows, 0] = tokens
                used = max(used, 1)
            for t in range(t0, max_steps):
                live = tokens != self.end_id
                rows, tokens = rows[live], tokens[live]
                if not len(rows):
                    break
                tokens = self.step(rows, tokens)
                out[start + rows, t] = tokens
                used = max(used, t + 1)
        return out[:, :used]

    def solve(self, problems: Sequence[str], max_steps: int | None = None) -> list[str]:
        """The answers to ``problems`` (texts such as ``7669+10132=``), by greedy decoding."""
        tokens = self.generate(self.encode(problems), max_steps)
        return [self.decode(row) for row in tokens]

    # ---- checks ----------------------------------------------------------------------------

    def _rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.size == 0:
            return np.zeros(0, dtype=np.int64)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows must be a 1-d list of ints, got {rows.dtype} {rows.shape}")
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if rows.min() < 0 or rows.max() >= self.max_rows:
            raise ValueError(
                f"rows must lie in 0..{self.max_rows - 1}, got {rows.min()}..{rows.max()}"
            )
        if len(np.unique(rows)) != len(rows):
            raise ValueError("rows must not repeat")
        return rows

    def _row(self, row: int) -> int:
        if not 0 <= int(row) < self.max_rows:
            raise ValueError(f"row must lie in 0..{self.max_rows - 1}, got {row}")
        return int(row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("problems", nargs="+", help="problems such as 7669+10132=")
    ap.add_argument("--model-dir", default="models/onnx")
    ap.add_argument("--provider", choices=PROVIDERS, default="auto")
    ap.add_argument("--pool", choices=POOLS, default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rt = Runtime(args.model_dir, provider=args.provider, pool=args.pool)
        answers = rt.solve(args.problems)
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{rt.kind} model {rt.model_version}, providers {rt.providers}, {rt.pool_kind} pool")
    for p, a in zip(args.problems, answers):
        print(f"{p}{a}")


if __name__ == "__main__":
    main()
