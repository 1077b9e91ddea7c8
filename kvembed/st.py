"""kvembed as a real `sentence_transformers.SentenceTransformer` (STYLE item 10: "hand users a real one").

    st = kvembed.to_sentence_transformer("smollm2-135m")          # or (a KVEmbedder), or any from_pretrained args
    st.encode(["a sentence"]) == KVEmbedder.encode(["a sentence"])  # within fp32 rounding (batches differ)
    st.encode_query(...), st.encode_document(...), st.similarity(...), st.start_multi_process_pool([...])
    st.save("dir"); SentenceTransformer("dir", trust_remote_code=True)   # offline: no weights are copied

The pipeline is sentence-transformers' own module API: `KVEmbeddingModule`, an `InputModule`, turns texts into
the method's token views (`preprocess`) and views into pooled vectors (`forward`, the method's `embed`); when the
method's `normalize` switch is on (the default), sentence-transformers' own `Normalize` module follows it, as in
all-MiniLM-L6-v2. So `normalize_embeddings` keeps sentence-transformers' meaning, "normalise again on top of the
model" (docs/ecosystem.md has the table):

    KVEmbedder.encode(x, normalize_embeddings=...)   None: the switch     True: unit     False: the pooled vector
    SentenceTransformer.encode(x, ...)               False (its default) / None: the switch      True: unit

They agree everywhere except KVEmbedder's False with the switch on; build with `normalize=False` for the pooled
vectors themselves (then both False give them, both True unit vectors).

Prompts: sentence-transformers hands the first module the prompt *string* (`prompts[prompt_name]`, or `prompt=`).
Ours are templates with a {text} slot, so a prompt with {text} is used as the template and a plain string p means
p + text (kvembed.encoder.template_of: the same rule as `KVEmbedder.encode(prompt=...)`); no prompt at all is the
method's own (document) template, or its fixed prompts (MetaEOL). An empty prompt is no prompt, as
sentence-transformers uses it (the raw text alone is prompt="{text}"). `prompts` = {"query": the method's query
template, "document": its document template}.

Saving writes what to load, not the weights: the model's name or absolute path, dtype, max_seq_length, the method
and every switch (`kvembed_config.json`); loading calls `KVEmbedder.from_pretrained` with them, so a named model,
a local folder or a cached hub id loads offline. The class lives outside `sentence_transformers`, so loading needs
`trust_remote_code=True` (sentence-transformers' rule for any module class it does not ship; nothing is
downloaded: the class is imported from the installed kvembed).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import warnings
from functools import partial
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import InputModule, Normalize

from .encoder import KVEmbedder, TruncationWarning, bucket_collate, repair_surrogates, template_of

CONFIG_FILE = "kvembed_config.json"


class KVEmbeddingModule(InputModule):
    """The first module of a kvembed SentenceTransformer: the frozen decoder, its tokenizer and one method.

    `features["views"]` holds each text's token views (a list, so `batch_to_device` leaves it alone: MetaEOL has
    eight views per text, Token Prepending a placeholder index); `forward` pads them on the decoder's device.
    """

    config_file_name = CONFIG_FILE
    config_keys = ["model", "method", "switches", "dtype", "max_seq_length", "truncate_dim", "weights_fingerprint"]

    def __init__(self, embedder: KVEmbedder, *, model: str | None = None, worker_threads: int | None = 1):
        super().__init__()
        self.decoder = embedder.model  # registered: .to(), .parameters(), share_memory() reach the weights
        self.tokenizer = embedder.tokenizer
        self.args = embedder.args
        self.method = embedder.method
        self.max_seq_length = embedder.max_seq_length
        # The embedder's own truncate_dim is applied here, before sentence-transformers' Normalize, so the vector
        # is cut first and normalised after, as KVEmbedder does (sentence-transformers' truncate_dim cuts after).
        self.truncate_dim = embedder.truncate_dim
        # What `save` writes so that loading finds the same weights: the embedder's name_or_path, or `model` when
        # given (e.g. the hub id of a folder you downloaded). The weights' fingerprint is saved too, checked on load.
        self.name_or_path = embedder.name_or_path if model is None else model
        self.weights_fingerprint = embedder.loaded.fingerprint
        self.compiled = embedder.compiled
        # object.__setattr__: a compiled decoder is an nn.Module too, and must not be registered as a second child
        object.__setattr__(self, "_compiled_model", embedder._forward_model if embedder.compiled else None)
        # Intra-op threads of a process this module is unpickled in (a multi-process pool worker): workers do not
        # inherit torch.set_num_threads, and N workers with torch's default each use every core. None: leave it.
        self.worker_threads = worker_threads

    # ------------------------------------------------------------------------------ identity and config

    @property
    def dtype_name(self) -> str:
        """The decoder's dtype now (a later .to(torch.bfloat16) included), as from_pretrained spells it."""
        return str(next(self.decoder.parameters()).dtype).removeprefix("torch.")

    def get_config_dict(self) -> dict[str, Any]:
        # every switch of the method as from_pretrained takes it (layers () is spelled "none")
        switches = {f.name: getattr(self.method, f.name) for f in dataclasses.fields(self.method)}
        if "layers" in switches:
            switches["layers"] = list(switches["layers"]) or "none"
        return {"model": self.name_or_path, "method": self.method.name, "switches": switches,
                "dtype": self.dtype_name, "max_seq_length": self.max_seq_length, "truncate_dim": self.truncate_dim,
                "weights_fingerprint": self.weights_fingerprint}

    def get_embedding_dimension(self) -> int:
        return self.truncate_dim or self.args.hidden_size

    def __repr__(self) -> str:
        return (f"KVEmbeddingModule(model={self.name_or_path!r}, method={self.method.name!r}, dtype={self.dtype_name}, "
                f"max_seq_length={self.max_seq_length})")

    # ------------------------------------------------------------------------------ texts -> vectors

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict[str, Any]:
        """Texts -> {"views": one list of token views per text}. `prompt`: a template or a prefix (see the module
        docstring); without one (None or ""), `task` ("query"/"document", from encode_query/encode_document) picks
        the method's own template."""
        if kwargs:
            raise ValueError(f"KVEmbeddingModule.preprocess got unsupported option(s) {sorted(kwargs)}")
        try:
            texts = []
            for i, t in enumerate(inputs):
                if not isinstance(t, str):
                    raise ValueError(f"inputs[{i}] is {type(t).__name__}, not str: kvembed embeds text only")
                texts.append(repair_surrogates(t) or t)  # as KVEmbedder.encode, so both give the same vector
            if prompt:  # "" is sentence-transformers' "no prompt" (what it fills in for a prompt never set)
                method, name = self.method.with_template(template_of(prompt)), None
            else:
                method, name = self.method, task if task in ("query", "document") else None
            views = [method.prepare(self.tokenizer, t, name, self.max_seq_length) for t in texts]
        except TypeError as e:
            # sentence-transformers answers a TypeError from preprocess by pasting the prompt onto the text and
            # calling again without it: that would embed a different string, silently.
            raise RuntimeError(f"KVEmbeddingModule.preprocess failed: {e}") from e
        if any(e.truncated for v in views for e in v):
            warnings.warn(f"texts longer than max_seq_length={self.max_seq_length} tokens were cut (the text, not "
                          "the instruction)", TruncationWarning, stacklevel=2)
        return {"views": views, "method": method}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        method = features.get("method", self.method)
        collate_fn = partial(bucket_collate, device=next(self.decoder.parameters()).device, compiled=self.compiled)
        e = method.embed(self._forward_model(), features["views"], collate_fn, normalize=False).float()  # (B, C)
        e = e[:, :self.truncate_dim]  # None: every dimension
        bad = ~torch.isfinite(e).all(-1)
        if bad.any():
            raise FloatingPointError(f"non-finite embedding (NaN or inf) for {int(bad.sum())} text(s) of this batch; "
                                     "try dtype='float32' or check the weights")
        features["sentence_embedding"] = e
        return features

    def _forward_model(self):
        if self.compiled and self._compiled_model is None:
            object.__setattr__(self, "_compiled_model", torch.compile(self.decoder, dynamic=False))
        return self._compiled_model if self.compiled else self.decoder

    # ------------------------------------------------------------------------------ pickling (the pool)

    def __getstate__(self):
        return {**self.__dict__, "_compiled_model": None}  # a compiled graph does not travel; rebuilt on first use

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.worker_threads and multiprocessing.parent_process() is not None:
            torch.set_num_threads(self.worker_threads)

    # ------------------------------------------------------------------------------ save / load

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, model_kwargs: dict | None = None, backend: str = "torch",
             **kwargs) -> "KVEmbeddingModule":
        """From a saved folder: `model_kwargs` may override from_pretrained's dtype, device, max_length or compile."""
        if backend != "torch":
            raise ValueError(f"backend={backend!r}: kvembed runs its own PyTorch decoder; use backend='torch'")
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        if not config:
            raise FileNotFoundError(f"{model_name_or_path}: no {CONFIG_FILE}; was this folder saved by kvembed?")
        return cls.from_config(config, **(model_kwargs or {}))

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "KVEmbeddingModule":
        missing = [k for k in ("model", "method", "dtype", "max_seq_length", "switches") if k not in config]
        if missing:
            raise ValueError(f"{CONFIG_FILE} lacks {', '.join(missing)}: it was not written by kvembed, or was edited; "
                             "save the model again with kvembed")
        options = dict(method=config["method"], dtype=config["dtype"], max_length=config["max_seq_length"],
                       truncate_dim=config.get("truncate_dim"), **config["switches"]) | overrides
        embedder = KVEmbedder.from_pretrained(config["model"], **options)
        saved = config.get("weights_fingerprint")
        if saved and saved != embedder.loaded.fingerprint:
            warnings.warn(f"{config['model'] or 'the default model'}: the weights now read "
                          f"(fingerprint {embedder.loaded.fingerprint}) differ from those the model was saved with "
                          f"({saved}); the embeddings will differ too", UserWarning, stacklevel=3)
        return cls(embedder, model=config["model"])


def to_sentence_transformer(model=None, *, device=None, worker_threads: int | None = 1,
                            **from_pretrained_kwargs) -> SentenceTransformer:
    """A `SentenceTransformer` whose encode equals `KVEmbedder.encode` (module docstring).

    model   a KVEmbedder, or what `KVEmbedder.from_pretrained` takes (None: the default model); the other keyword
            arguments go to from_pretrained (method=, dtype=, max_length=, prompts=, truncate_dim=, switches...)
    device  where the SentenceTransformer puts the model (default: the embedder's device, never a silent move)
    """
    if isinstance(model, KVEmbedder):
        if from_pretrained_kwargs:
            raise TypeError(f"to_sentence_transformer(KVEmbedder, ...) takes no from_pretrained options "
                            f"({sorted(from_pretrained_kwargs)}): they were fixed when the embedder was built")
        embedder = model
    else:
        embedder = KVEmbedder.from_pretrained(model, **({"device": device} if device else {}), **from_pretrained_kwargs)
    modules = [KVEmbeddingModule(embedder, worker_threads=worker_threads)]
    if embedder.method.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device=str(device or embedder.device), prompts=embedder.prompts,
                               default_prompt_name=embedder.default_prompt_name,
                               similarity_fn_name=embedder.similarity_fn_name)
