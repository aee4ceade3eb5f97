"""A sparse random first-order Markov chain: synthetic text whose entropy is exact.

The generalization experiment's second data kind. Unlike uniform tokens this source
has structure a model can learn (each token has only `branching` possible successors),
yet H(x | θ) is known exactly: the chain's entropy rate times the number of coded
tokens, and -log2 p(x | θ) of any one sequence is a sum of logs of its transitions.

Each row i of the V x V transition matrix P has exactly `branching` non-zero entries
with Dirichlet(concentration) weights. One of them is always (i + 1) mod V, so every
token reaches every other: the chain is irreducible and has one stationary
distribution π. Token 0 of a sample is drawn from π, so every position is distributed
as π and the expected code length of a sequence is exactly (S - 1) · rate.

The chain is stored sparsely, as a (V, branching) table of successors and their
probabilities; the dense matrix is built only when `transitions` is read.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from .bits import coded_tokens
from .errors import ConfigError
from .data import BLOCK

# Sampling runs this many sequences at a time through the chain: big enough to amortise
# numpy's per-call cost over S steps, small enough to keep the uniforms in cache-sized memory.
SAMPLE_CHUNK = 64 * BLOCK
# Up to this vocabulary the stationary distribution comes from a sparse LU solve (exact, under
# a second); above it from GMRES, checked against STATIONARY_RTOL, with LU as the fallback up
# to FALLBACK_SOLVE_MAX_V (about 20 s there; LU time grows as V³ on these random graphs).
DIRECT_SOLVE_MAX_V = 2048
FALLBACK_SOLVE_MAX_V = 8192
STATIONARY_RTOL = 1e-10  # max |πP - π| allowed, relative to max π


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class MarkovSource:
    """A sparse random Markov chain over `vocab_size` tokens, deterministic from `seed`."""

    def __init__(self, vocab_size: int, branching: int = 4, seed: int = 0, concentration: float = 1.0):
        if not _is_int(vocab_size) or vocab_size < 2:
            raise ConfigError(f"vocab_size must be an integer >= 2 for a Markov source, got {vocab_size!r}")
        if not _is_int(branching) or not 1 <= branching <= vocab_size:
            raise ConfigError(
                f"branching must be an integer in [1, vocab_size={vocab_size}] (successors per token), got {branching!r}"
            )
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        try:
            concentration = float(concentration)
        except (TypeError, ValueError):
            raise ConfigError(f"concentration must be a positive number, got {concentration!r}") from None
        if not np.isfinite(concentration) or concentration <= 0:
            raise ConfigError(
                f"concentration must be a positive finite number (Dirichlet parameter; 1.0 = uniform over "
                f"the simplex, smaller = more peaked rows), got {concentration!r}"
            )
        self.vocab_size = int(vocab_size)
        self.branching = int(branching)
        self.seed = int(seed)
        self.concentration = concentration

        V, b = self.vocab_size, self.branching
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, V, b]))
        # Column 0 is the cycle edge i -> i+1 that makes the chain irreducible; the other
        # b-1 successors are distinct tokens drawn from the remaining V-1.
        succ = np.empty((V, b), dtype=np.int64)
        succ[:, 0] = (np.arange(V) + 1) % V
        if b > 1:
            for i in range(V):
                others = rng.choice(V - 1, size=b - 1, replace=False)
                # Skip over the cycle successor: indices 0..V-2 map onto tokens != (i+1) mod V.
                succ[i, 1:] = others + (others >= succ[i, 0])
        weights = rng.dirichlet(np.full(b, concentration), size=V)
        # A very small concentration can underflow a Dirichlet weight to exactly 0; lift it to
        # the smallest normal float so every row keeps exactly `branching` successors.
        weights = np.maximum(weights, np.finfo(np.float64).tiny)
        weights /= weights.sum(axis=1, keepdims=True)

        self.successors = succ  # (V, b) int64: row i's possible next tokens
        self.successor_probs = weights  # (V, b) float64: their probabilities, rows sum to 1
        self._successor_bits = -np.log2(weights)  # (V, b): code length of each transition
        cum = np.cumsum(weights, axis=1)
        cum[:, -1] = 1.0  # rounding must not leave a sliver above the last successor
        self._cum = cum
        self.stationary = self._solve_stationary()
        stationary_cum = np.cumsum(self.stationary)
        stationary_cum[-1] = 1.0
        self._stationary_cum = stationary_cum

    # ---- the chain -----------------------------------------------------------------------

    def _sparse(self) -> scipy.sparse.csr_matrix:
        V, b = self.vocab_size, self.branching
        rows = np.repeat(np.arange(V), b)
        return scipy.sparse.csr_matrix((self.successor_probs.ravel(), (rows, self.successors.ravel())), shape=(V, V))

    @functools.cached_property
    def transitions(self) -> np.ndarray:
        """The dense (V, V) float64 transition matrix, P[i, j] = p(next = j | current = i).

        Built on first use (V² floats: 32 MB at V=2048); the source itself works from the
        sparse successor table.
        """
        return self._sparse().toarray()

    def _solve_stationary(self) -> np.ndarray:
        # π P = π as a linear system, not power iteration: the chain can be periodic (branching 1
        # is the cycle) and then power iteration never converges.
        V = self.vocab_size
        P = self._sparse().tocsc()
        pi = None
        if V > DIRECT_SOLVE_MAX_V:
            # A random sparse graph fills in an LU factorisation almost completely (V=8192 takes
            # 20 s); restarted GMRES takes under a second when the chain mixes well. Pin
            # π_{V-1} = 1: the rest solve (I - Qᵀ) x = P[V-1, :V-1], Q = P less its last row and
            # column, non-singular because the chain is irreducible.
            A = (scipy.sparse.identity(V - 1, format="csc") - P[:-1, :-1].T).tocsc()
            x, _ = scipy.sparse.linalg.gmres(A, P[-1, :-1].toarray().ravel(), rtol=1e-12, restart=50, maxiter=40)
            pi = np.clip(np.append(x, 1.0), 0.0, None)
            pi /= pi.sum()
            if not self._residual(P, pi) <= STATIONARY_RTOL:
                pi = None  # slow-mixing chain: GMRES stalled
        if pi is None and V <= FALLBACK_SOLVE_MAX_V:
            # Exact route: the rows of (Pᵀ - I) sum to zero, so one is redundant; replace it with
            # Σ π = 1. Unlike pinning one entry this cannot overflow when some π_i are tiny.
            A = (P.T - scipy.sparse.identity(V, format="csc")).tocsr()
            A = scipy.sparse.vstack([A[:-1], scipy.sparse.csr_matrix(np.ones((1, V)))]).tocsc()
            rhs = np.zeros(V)
            rhs[-1] = 1.0
            lu = scipy.sparse.linalg.splu(A)
            pi = lu.solve(rhs)
            pi += lu.solve(rhs - A @ pi)  # one step of iterative refinement: LU round-off grows with V
            pi = np.clip(pi, 0.0, None)  # π > 0: clip round-off
            pi /= pi.sum()
        if pi is None or not self._residual(P, pi) <= STATIONARY_RTOL:
            raise ConfigError(
                f"could not solve for the stationary distribution of {self!r} to {STATIONARY_RTOL:g}: "
                f"the chain mixes too slowly for vocab_size={V}; raise concentration or branching, "
                f"or lower vocab_size"
            )
        return pi

    @staticmethod
    def _residual(P, pi: np.ndarray) -> float:
        """max |πP - π|, relative to max π."""
        return float(np.abs(P.T @ pi - pi).max() / pi.max())

    def entropy_rate_bits(self) -> float:
        """Σ_i π_i H(P_i.): the expected code length of one token given the one before, in bits."""
        p = self.successor_probs
        row_entropy = -(p * np.log2(p)).sum(axis=1)
        return float(self.stationary @ row_entropy)

    def sequence_entropy_bits(self, seq_len: int) -> float:
        """H(x | θ) of one sequence over its coded tokens 1..S-1: (S - 1) · rate."""
        if not _is_int(seq_len) or seq_len < 1:
            raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}")
        return coded_tokens(int(seq_len)) * self.entropy_rate_bits()

    # ---- data ----------------------------------------------------------------------------

    def sample(self, n: int, seq_len: int, seed: int) -> torch.Tensor:
        """n sequences (n, seq_len) int64: token 0 ~ π, then the chain, deterministic from seed.

        Sequences come in blocks of 1024, each from its own child seed, so for one seed the
        first m of sample(n, ...) are sample(m, ...): dataset sizes nest, as for uniform data.
        """
        for name, value in (("n", n), ("seq_len", seq_len)):
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        n, seq_len = int(n), int(seq_len)
        n_blocks = -(-n // BLOCK)
        children = np.random.SeedSequence([int(seed), self.seed, self.vocab_size, self.branching, seq_len]).spawn(
            n_blocks
        )
        out = np.empty((n_blocks * BLOCK, seq_len), dtype=np.int64)
        blocks_per_chunk = SAMPLE_CHUNK // BLOCK
        for first in range(0, n_blocks, blocks_per_chunk):
            chunk = children[first : first + blocks_per_chunk]
            u = np.concatenate([np.random.default_rng(c).random((BLOCK, seq_len)) for c in chunk])
            self._run_chain(u, out[first * BLOCK : first * BLOCK + len(u)])
        return torch.from_numpy(out[:n])

    def _run_chain(self, u: np.ndarray, out: np.ndarray) -> None:
        # Inverse CDF, vectorised over sequences: the next token is the first successor whose
        # cumulative probability exceeds the uniform draw.
        last = self.branching - 1
        x = np.minimum(np.searchsorted(self._stationary_cum, u[:, 0], side="right"), self.vocab_size - 1)
        out[:, 0] = x
        for t in range(1, u.shape[1]):
            k = np.minimum((u[:, t, None] >= self._cum[x]).sum(axis=1), last)
            x = self.successors[x, k]
            out[:, t] = x

    def sequence_bits(self, sequences) -> np.ndarray:
        """Exact -log2 Π_{t=1..S-1} P(x_t | x_{t-1}) per sequence, float64 (n,).

        Token 0 is context and is not coded (memk's convention, memorize/bits.py).
        """
        x = sequences.detach().cpu().numpy() if isinstance(sequences, torch.Tensor) else np.asarray(sequences)
        if x.ndim != 2:
            raise ValueError(f"sequences must be a 2-D (n, seq_len) array of token ids, got shape {tuple(x.shape)}")
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"sequences must hold integer token ids, got dtype {x.dtype}")
        V = self.vocab_size
        bad = (x < 0) | (x >= V)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(
                f"token {int(x[r, c])} at sequence {r}, position {c} is outside [0, {V}): "
                f"this source has vocab_size={V}"
            )
        x = x.astype(np.int64, copy=False)
        return np.concatenate(
            [self._chunk_bits(x[i : i + SAMPLE_CHUNK // 8], i) for i in range(0, len(x), SAMPLE_CHUNK // 8)]
            or [np.zeros(0)]
        )

    def _chunk_bits(self, x: np.ndarray, offset: int) -> np.ndarray:
        prev, nxt = x[:, :-1], x[:, 1:]
        # Which of the previous token's successors the next token is (one at most: they are distinct).
        match = self.successors[prev] == nxt[..., None]  # (n, S-1, b)
        found = match.any(axis=-1)
        if not found.all():
            r, c = np.argwhere(~found)[0]
            a, z = int(prev[r, c]), int(nxt[r, c])
            raise ValueError(
                f"sequence {offset + r}, position {c + 1}: transition {a} -> {z} has probability 0 under this "
                f"source (row {a} has successors {sorted(self.successors[a].tolist())}); the sequence was not "
                f"drawn from this MarkovSource (check vocab_size, branching, seed)"
            )
        k = match.argmax(axis=-1)
        return self._successor_bits[prev, k].sum(axis=1, dtype=np.float64)

    def describe(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "branching": self.branching,
            "seed": self.seed,
            "concentration": self.concentration,
            "entropy_rate_bits": self.entropy_rate_bits(),
        }

    def __repr__(self) -> str:
        return (
            f"MarkovSource(vocab_size={self.vocab_size}, branching={self.branching}, seed={self.seed}, "
            f"concentration={self.concentration})"
        )
