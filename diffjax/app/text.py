"""A text model's captions, tokenizer and prompts (``text.encoder`` != "none"), or its
precomputed embeddings (``text.encoder`` "embeddings").

Training builds the tokenizer from the train split's captions and keeps it in
``WORKDIR/tokenizer.json`` (a resumed run checks that its data still gives the same one);
sampling and evaluation read it back from the run, so prompts are tokenized exactly as the
captions the model learned from, and every bad prompt is one line before any checkpoint is
read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np

from diffjax import data as data_lib
from diffjax import text as text_lib
from diffjax.data import text_source
from diffjax.specs import Experiment

TOKENIZER_FILE = "tokenizer.json"


def tokenizer_path(run_dir: str) -> str:
    return os.path.join(run_dir, TOKENIZER_FILE)


@functools.lru_cache(maxsize=4)
def _captioner(name: str, source_kwargs: tuple, seed: int, keep_prob: float):
    train = data_lib.make_source(**dict(source_kwargs))
    return text_source.CAPTIONERS[name](train, seed=seed, keep_prob=keep_prob)


def captioner(experiment: Experiment):
    """The captioner of ``text.captions`` over this experiment's data (thresholds from the
    train split; built once per process)."""
    t = experiment.text
    kwargs = tuple(sorted(experiment.data.source_kwargs("train").items()))
    return _captioner(t.captions, kwargs, t.caption_seed, t.caption_keep_prob)


def _check_fits(experiment: Experiment, tokenizer: text_lib.Tokenizer, where: str) -> None:
    t = experiment.text
    if tokenizer.kind != t.tokenizer or tokenizer.context_length != t.context_length:
        raise text_lib.TextError(
            f"{where} is a {tokenizer.kind} tokenizer of context length "
            f"{tokenizer.context_length}, the config asks for {t.tokenizer} / "
            f"{t.context_length}: set text.tokenizer and text.context_length as that run had")
    limit = 257 if t.tokenizer == "byte" else t.vocab_size
    if tokenizer.vocab_size > limit:
        raise text_lib.TextError(
            f"the captions have {tokenizer.vocab_size - 1} distinct words but text.vocab_size="
            f"{t.vocab_size} holds {t.vocab_size - 1}: set --config.text.vocab_size="
            f"{tokenizer.vocab_size} or more")


def training_tokenizer(experiment: Experiment, workdir: str) -> text_lib.Tokenizer:
    """The tokenizer built from the train split's captions, written to
    ``WORKDIR/tokenizer.json`` on the first run; a resumed run must build the same one."""
    t = experiment.text
    train = data_lib.make_source(**experiment.data.source_kwargs("train"))
    built = text_lib.Tokenizer.build(t.tokenizer, captioner(experiment).captions(train),
                                     t.context_length)
    _check_fits(experiment, built, "the tokenizer of the training captions")
    path = tokenizer_path(workdir)
    if os.path.exists(path):
        saved = text_lib.Tokenizer.load(path)
        if saved != built:
            raise text_lib.TextError(
                f"{path} was built from other captions than this config's data gives "
                f"({len(saved.vocab)} vs {len(built.vocab)} words): resume with the run's own "
                "data and text settings, or use a new --workdir")
    elif jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        built.save(path)
    return built


def load_tokenizer(experiment: Experiment, run_dir: str) -> text_lib.Tokenizer:
    """The tokenizer a trained run wrote (one-line TextError if missing or corrupt)."""
    path = tokenizer_path(run_dir)
    if not os.path.exists(path):
        raise text_lib.TextError(f"{path} not found: it is written when a text model starts "
                                 "training; train this config in that workdir first (or pass "
                                 "--checkpoint of the run that did)")
    tokenizer = text_lib.Tokenizer.load(path)
    _check_fits(experiment, tokenizer, path)
    return tokenizer


def train_iterator(experiment: Experiment, tokenizer: text_lib.Tokenizer,
                   process_index: int, process_count: int, inner=None):
    """Training batches {"image", "label", "tokens"} of this process (the train split with
    each example's caption tokens); inner: a latent cache of the train split to read instead
    of its images (batches {"mean", "std", "label", "tokens"})."""
    d, seed = experiment.data, experiment.train.seed
    train = data_lib.make_source(**d.source_kwargs())
    tokens = tokenizer.encode(captioner(experiment).captions(train))
    source = text_source.CaptionedSource(train if inner is None else inner, tokens)
    return iter(data_lib.build_dataset(
        source, global_batch_size=d.batch_size, seed=seed, shuffle=True,
        random_flip=d.random_flip, process_index=process_index, process_count=process_count,
        num_epochs=None, drop_remainder=True, num_workers=d.num_workers))


def embedding_train_iterator(experiment: Experiment, process_index: int, process_count: int,
                             inner=None):
    """Training batches {"image", "label", "context"} of a model of precomputed embeddings
    (``text.embeddings``, checked against the data before any work); inner: a latent cache
    of the train split to read instead of its images."""
    d, t = experiment.data, experiment.text
    train = data_lib.make_source(**d.source_kwargs()) if inner is None else inner
    if text_source.is_record_file(t.embeddings):  # read per batch
        source = text_source.RecordEmbeddingSource(train, text_source.RecordEmbeddings(
            t.embeddings, t.width, t.context_length, count=len(train)))
    else:
        context, mask, _ = text_source.load_embeddings(t.embeddings, t.width, t.context_length,
                                                       count=len(train))
        source = text_source.EmbeddingSource(train, context, mask)
    return iter(data_lib.build_dataset(
        source, global_batch_size=d.batch_size, seed=experiment.train.seed, shuffle=True,
        random_flip=d.random_flip, process_index=process_index, process_count=process_count,
        num_epochs=None, drop_remainder=True, num_workers=d.num_workers))


def _sample_embeddings(experiment: Experiment, rows: int | None = None
                       ) -> tuple[list[str], np.ndarray]:
    """(row labels, packed conditions [P, L, D + 1]) of ``text.sample_embeddings``, or of the
    first ``rows`` training examples when it is unset (only with ``rows``)."""
    t = experiment.text
    path = t.sample_embeddings
    if not path and rows is None:
        raise text_lib.TextError("a model of precomputed embeddings samples from the "
                                 "prompts' embeddings: set --config.text.sample_embeddings="
                                 "FILE.npz (context [P, L, width], mask, optional prompts)")
    context, mask, prompts = text_source.load_embeddings(
        path or t.embeddings, t.width, t.context_length, rows=None if path else rows)
    if not path:
        prompts = None
    labels = list(prompts) if prompts is not None else [f"#{i}" for i in range(len(context))]
    return labels, text_source.pack(context, mask)


def conditions(experiment: Experiment, tokenizer: text_lib.Tokenizer | None, num_samples: int,
               purpose: str) -> tuple[list[str], list[str], np.ndarray, int]:
    """What a text model samples from: (row labels [P], each sample's label [N'], their
    conditions [N', ...] (tokens, or packed embeddings), samples per row), every row repeated
    ceil(num_samples / P) times in a row. ``purpose``: "grid" (training grids, --mode
    sample) or "eval"."""
    if experiment.text.precomputed:
        rows, cond = _sample_embeddings(experiment, 8 if purpose == "grid" else None)
        per = max(1, -(-num_samples // len(rows)))
        order = np.repeat(np.arange(len(rows)), per)
        return rows, [rows[i] for i in order], cond[order], per
    prompts = prompts_for(experiment, purpose)
    per_sample, tokens, per = prompt_samples(tokenizer, prompts, num_samples)
    return list(prompts), per_sample, tokens, per


def prompts_for(experiment: Experiment, purpose: str) -> tuple[str, ...]:
    """``sampler.prompts``, else the captioner's defaults for ``purpose`` ("grid": one per
    class; "eval": every class x attribute combination)."""
    if experiment.text.prompts:
        return experiment.text.prompts
    cap = captioner(experiment)
    return cap.grid_prompts() if purpose == "grid" else cap.eval_prompts()


def prompt_samples(tokenizer: text_lib.Tokenizer, prompts: Sequence[str], num_samples: int
                   ) -> tuple[list[str], np.ndarray, int]:
    """(each sample's prompt [N'], their tokens [N', L], samples per prompt): every prompt
    repeated ceil(num_samples / len(prompts)) times in a row (N' >= num_samples)."""
    tokens = tokenizer.encode(list(prompts))  # one-line TextError for a bad prompt
    per = max(1, -(-num_samples // len(prompts)))
    order = np.repeat(np.arange(len(prompts)), per)
    return [prompts[i] for i in order], tokens[order], per
