"""The labelling pipeline: scorers run over texts on Ray Data, one actor pool per `LabelSpec`.

What crosses the object store is small: the input blocks hold only a row number and the text,
and a scorer actor returns only the row number and its numeric columns (`prefix + column`).
Ids, texts and any record metadata stay in the driver, which puts the scores back in input
order by row number. Each `LabelSpec` is one pass over the same input blocks with its own pool
(`map_batches(ScorerActor, compute=ActorPoolStrategy(size=actors), batch_size=..., num_cpus=...,
num_gpus=...)`), so pools never wait for each other's resources.

Ray: when Ray is already initialised (a farm driver, or inside a Ray task or actor) the pipeline
uses that cluster and leaves it running. Otherwise it starts one for the call (`$RAY_ADDRESS` if
set, else a new local Ray) and shuts it down after: a one-off labelling pays `ray.init` (~3-5 s)
and leaves nothing behind; a caller that labels repeatedly initialises Ray itself, once. An actor
pool needs `actors * cpus_per_actor` free CPUs (and GPUs) beside whatever the caller holds: a
pool that no node, alive or launchable by the cluster's autoscaler, can ever hold is refused up
front, since Ray Data would wait for it forever.

Entry points: `label_records` (a study's labelling stage; returns {id: {column: score}}),
`label_file` (the `farm label` command; writes one parquet file atomically), `label_texts`
(scores as columns), `read_input` (a file or hub split as ids and texts, checked before Ray).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from farm.capacity import capacity
from farm.data.sources import read_file_rows
from farm.files import atomic_write
from farm.hub import runtime_env
from farm.label.scorers import build, check, known_columns

ROW = "__farm_row"  # the row's position in the input; the only column besides the text that actors see
TEXT = "text"
READABLE = (".parquet", ".jsonl", ".json", ".csv")
RESERVED = ("id", "text", ROW)  # output columns that scores may not take


# ---------------------------------------------------------------- the actor


class ScorerActor:
    """One scorer in one Ray actor: arrow batches of (row, text) in, (row, score columns) out."""

    def __init__(self, scorer: str, model: str | None, prefix: str, cpus: float, gpus: float, batch_size: int):
        threads = max(1, int(cpus))
        # Before anything starts a thread pool: torch (OpenMP), the Rust tokenizers (rayon).
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"

        kwargs = {"model": model} if model else {}
        if scorer in ("detoxify", "roberta_hate", "auto"):
            import torch

            torch.set_num_threads(threads)
            with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
                torch.set_num_interop_threads(threads)
            kwargs["device"] = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
            kwargs["batch_size"] = min(batch_size, 64)  # rows per forward pass on CPU; more on GPU is fine
            if kwargs["device"] == "cuda":
                kwargs["batch_size"] = batch_size
        self.scorer = build(scorer, **kwargs)
        self.prefix = prefix

    def __call__(self, batch):
        import pyarrow as pa

        texts = [t or "" for t in batch.column(TEXT).to_pylist()]
        fields = self.scorer.fields(texts)
        return pa.table({ROW: batch.column(ROW), **{self.prefix + c: pa.array(np.asarray(v, dtype=np.float64)) for c, v in fields.items()}})


# ---------------------------------------------------------------- checks before Ray


def check_labels(labels) -> list[str]:
    """Raise ValueError for a scorer that cannot be built or for two scores that would share a
    column; return the output columns known before the scorers load."""
    if not labels:
        raise ValueError("no scorer given")
    seen: dict[str, str] = {}
    for spec in labels:
        check(spec.scorer, spec.model)
        for column in known_columns(spec.scorer):
            name = spec.prefix + column
            if name in RESERVED:
                raise ValueError(f"scorer {spec.scorer}: column {name!r} is reserved; give the scorer a prefix")
            if name in seen:
                raise ValueError(f"scorers {seen[name]} and {spec.scorer} both give column {name!r}; give one of them a prefix")
            seen[name] = spec.scorer
    return list(seen)


def check_pool(spec, cap=None) -> None:
    """Refuse a pool that no node of the cluster, alive or launchable by its autoscaler, can ever
    hold (`farm.capacity`): Ray Data would wait for it forever. A pool that fits only once the
    autoscaler starts nodes, or the caller's own tasks finish, waits for them."""
    cap = cap or capacity()
    actor = {"CPU": spec.cpus_per_actor, "GPU": spec.gpus_per_actor}
    held = cap.bundles(actor)
    if held < spec.actors:
        pool = f"{spec.actors} actors x {spec.cpus_per_actor:g} CPU" + (f", {spec.gpus_per_actor:g} GPU" if spec.gpus_per_actor else "")
        why = "no node can hold one actor" if held == 0 else f"at most {held} such actors fit at once"
        raise ValueError(
            f"scorer {spec.scorer}: an actor pool of {pool} can never run on this Ray cluster: {why} "
            f"({cap.describe()}); lower `actors` or `cpus_per_actor`/`gpus_per_actor`, or add a node type that holds them"
        )


# ---------------------------------------------------------------- Ray


@contextlib.contextmanager
def ray_session(progress: bool = False):
    """Use the running Ray, or start one (`$RAY_ADDRESS`, else local) and shut it down after.
    Ray Data's progress bars and INFO logs only with `progress`."""
    import ray

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        # A cluster's workers do not inherit this process's environment: the hub settings (a token)
        # go in the job's runtime env, as in `farm run` (farm.hub.runtime_env).
        env = None
        if address:
            env = runtime_env({})
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, runtime_env=env)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    bars, level = ctx.enable_progress_bars, logging.getLogger("ray.data").level
    if not progress:
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.enable_progress_bars = bars
        logging.getLogger("ray.data").setLevel(level)
        if started:
            ray.shutdown()


BLOCKS_PER_ACTOR = 8


def rows_per_block(n: int, labels, per_actor: int = BLOCKS_PER_ACTOR) -> int:
    """Input block size. One block is one actor task (scored in `batch_size` slices inside it), so
    large blocks amortise Ray's per-task cost; several blocks per actor keep every actor busy to
    the end (an actor left with the last block works alone). A block is at least one batch."""
    actors = max(spec.actors for spec in labels)
    batch = max(spec.batch_size for spec in labels)
    return max(batch, math.ceil(n / (per_actor * actors)))


def texts_dataset(texts, block_rows: int):
    """A Ray dataset of (row, text) blocks put from the driver."""
    import pyarrow as pa
    import ray

    column = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array([t or "" for t in texts], pa.string())
    table = pa.table({ROW: pa.array(np.arange(len(column), dtype=np.int64)), TEXT: column})
    blocks = [table.slice(i, block_rows) for i in range(0, max(len(table), 1), block_rows)]
    return ray.data.from_arrow(blocks)


def hub_dataset(hf, text_column: str, block_rows: int):
    """A Ray dataset of (row, text) from a Hugging Face dataset, through `ray.data.from_huggingface`
    (a selected, re-numbered dataset is not the hub's own, so Ray reads its arrow table)."""
    import ray

    hf = hf.select_columns([text_column])
    if text_column != TEXT:
        hf = hf.rename_column(text_column, TEXT)
    hf = hf.add_column(ROW, np.arange(len(hf), dtype=np.int64))
    return ray.data.from_huggingface(hf, override_num_blocks=max(1, math.ceil(len(hf) / block_rows)))


def scored(ds, spec):
    """The lazy dataset of (row, prefix + column...) that the actor pool of `spec` produces."""
    import ray.data

    return ds.map_batches(
        ScorerActor,
        fn_constructor_kwargs=dict(
            scorer=spec.scorer, model=spec.model, prefix=spec.prefix, cpus=spec.cpus_per_actor, gpus=spec.gpus_per_actor, batch_size=spec.batch_size
        ),
        compute=ray.data.ActorPoolStrategy(size=spec.actors),
        batch_size=spec.batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor or None,
    )


def iter_scores(ds, spec) -> Iterator:
    """Arrow tables of (row, prefix + column...) as the pool of `spec` produces them (any order)."""
    yield from scored(ds, spec).iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def in_order(tables, n: int) -> dict[str, np.ndarray]:
    """Concatenate result tables and sort them back into input order, checking every row came back once."""
    import pyarrow as pa

    table = pa.concat_tables(tables) if tables else None
    rows = table.column(ROW).to_numpy() if table is not None else np.zeros(0, np.int64)
    order = np.argsort(rows, kind="stable")
    if len(rows) != n or not np.array_equal(rows[order], np.arange(n)):
        raise RuntimeError(f"labelling returned {len(rows)} rows for {n} inputs")
    return {c: table.column(c).to_numpy()[order] for c in table.column_names if c != ROW}


def score_dataset(ds, n: int, labels, log=None, blocks: int | None = None) -> dict[str, np.ndarray]:
    """Every spec's columns over a (row, text) dataset of n rows (in `blocks` blocks: no pool
    gets more actors than that), in input order."""
    columns: dict[str, np.ndarray] = {}
    for spec in labels:
        check_pool(spec)
        if blocks and spec.actors > blocks:  # an actor with no block would only cost its start
            spec = spec.model_copy(update={"actors": blocks})
        start = time.perf_counter()
        got = in_order(list(iter_scores(ds, spec)), n)
        clash = sorted(set(got) & (set(columns) | set(RESERVED)))
        if clash:
            raise ValueError(f"scorer {spec.scorer}: column {clash[0]!r} is taken; give it a prefix")
        columns.update(got)
        if log:
            log(
                f"{spec.scorer}{':' + spec.model if spec.model else ''}: {n} rows in {time.perf_counter() - start:.1f}s "
                f"({spec.actors} actors), columns {', '.join(got)}"
            )
    return columns


def label_texts(texts, labels, log=None) -> dict[str, np.ndarray]:
    """{column: scores in input order} for a list (or arrow array) of texts."""
    labels = list(labels)
    check_labels(labels)
    if not len(texts):
        return {}
    block = rows_per_block(len(texts), labels)
    with ray_session():
        return score_dataset(texts_dataset(texts, block), len(texts), labels, log, blocks=math.ceil(len(texts) / block))


def label_records(records, labels) -> dict:
    """{record id: {column: score}} for records with `.id` and `.text` (e.g. `Text`), in input
    order. Only the texts go to Ray; ids must be unique."""
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("label_records: record ids are not unique")
    columns = label_texts([r.text for r in records], labels)
    values = {c: v.tolist() for c, v in columns.items()}
    return {rid: {c: v[i] for c, v in values.items()} for i, rid in enumerate(ids)}


# ---------------------------------------------------------------- files


class InputError(ValueError):
    """An input the pipeline cannot read: raised before Ray starts."""


class Input:
    """Ids and texts read in the driver; `hf` is set for a hub split (read through Ray Data's
    `from_huggingface`)."""

    def __init__(self, ids, texts, hf=None, text_column: str = TEXT):
        self.ids, self.texts, self.hf, self.text_column = ids, texts, hf, text_column

    def __len__(self) -> int:
        return len(self.texts)


def read_input(source, text_column: str = TEXT, id_column: str | None = None) -> Input:
    """A .parquet/.jsonl/.json/.csv file, or `hub:owner/name[:split]` (default split: train).
    Ids: the `id_column`, else the row number. Missing texts become empty strings."""
    import pyarrow as pa

    source = str(source)
    if source.startswith("hub:"):
        return _read_hub(source[4:], text_column, id_column)
    path = Path(source).expanduser()
    if path.suffix.lower() not in READABLE:
        raise InputError(f"{source}: not a readable file type (give {', '.join(READABLE)}, or hub:owner/name[:split])")
    if not path.is_file():
        raise InputError(f"{source}: no such file")
    try:
        if path.suffix.lower() == ".parquet":  # only the two columns are read
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            _check_columns(names, source, text_column, id_column)
            table = pq.read_table(path, columns=[c for c in (text_column, id_column) if c])
        else:
            rows = read_file_rows(path)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise InputError(f"{source}: expected a list of objects (one per row)")
            _check_columns(list(dict.fromkeys(k for r in rows for k in r)), source, text_column, id_column)
            table = pa.table({c: _column([r.get(c) for r in rows]) for c in (text_column, id_column) if c})
        return _from_table(table, source, text_column, id_column)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise InputError(f"{source}: cannot be read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _check_columns(names: list[str], source: str, text_column: str, id_column: str | None) -> None:
    for role, column in (("text", text_column), ("id", id_column)):
        if column is not None and column not in names:
            raise InputError(f"{source}: no {role} column {column!r}; its columns: {', '.join(names) or 'none'}")


def _column(values: list):
    """An arrow column of JSON/CSV values; mixed types (ids 1 and "a") become strings."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _from_table(table, source: str, text_column: str, id_column: str | None) -> Input:
    """Texts as strings (missing ones empty) and ids (the column, else row numbers) of a table
    whose columns were checked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = pc.fill_null(pc.cast(table.column(text_column), pa.string()), "")
    ids = table.column(id_column) if id_column else pa.array(np.arange(table.num_rows, dtype=np.int64))
    if id_column and len(pc.unique(ids)) != len(ids):
        raise InputError(f"{source}: id column {id_column!r} has repeated values")
    return Input(ids, texts)


def _read_hub(name: str, text_column: str, id_column: str | None) -> Input:
    import datasets

    repo, _, split = name.partition(":")
    try:
        hf = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"hub:{name}: cannot be loaded: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    _check_columns(hf.column_names, f"hub:{name}", text_column, id_column)
    got = _from_table(hf.select_columns([c for c in (text_column, id_column) if c]).with_format("arrow")[:], f"hub:{name}", text_column, id_column)
    got.hf, got.text_column = hf, text_column
    return got


def label_input(data: Input, labels, log=None, progress: bool = False):
    """The output table: id, text and every score column, in input order."""
    import pyarrow as pa

    labels = list(labels)
    check_labels(labels)
    n = len(data)
    columns = {}
    if n:
        with ray_session(progress):
            block = rows_per_block(n, labels)
            ds = hub_dataset(data.hf, data.text_column, block) if data.hf is not None else texts_dataset(data.texts, block)
            columns = score_dataset(ds, n, labels, log, blocks=math.ceil(n / block))
    return pa.table({"id": data.ids, "text": data.texts, **{c: pa.array(v, pa.float64()) for c, v in columns.items()}})


def write_parquet(table, path) -> Path:
    """Write under a temporary name and rename: a reader sees the old file or the whole new one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(Path(path), sink.getvalue().to_pybytes())
    return Path(path)


def label_file(input, output_parquet, labels, text_column: str = TEXT, id_column: str | None = None, log=None):
    """Score a file (or `hub:owner/name[:split]`) and write `output_parquet` atomically with
    columns id, text and `prefix + column` per score, rows in input order. Returns the table."""
    labels = list(labels)
    check_labels(labels)  # before reading a large file
    table = label_input(read_input(input, text_column, id_column), labels, log)
    write_parquet(table, output_parquet)
    return table
