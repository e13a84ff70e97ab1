"""The results store: every trial and every epoch of every run and sweep, as plain Parquet.

This module is the public face of the store, the single owner of the results schema. Runs
(``hardmix train``) and sweeps (``tune``) write through :class:`ResultStore` (usually via
:class:`StoreCallback`); the analysis reads through :func:`read_results`; DuckDB, polars and
pandas can read the same files directly. Each job has its module, whose names this one hands on:

* :mod:`ablations.schema` -- columns, trial ids, rows, migrations;
* :mod:`ablations.writer` -- :class:`ResultStore` and :class:`StoreCallback`, the atomic writer;
* :mod:`ablations.reader` -- :func:`read_results`, the deduplicating reader;
* :mod:`ablations.compaction` -- :meth:`ResultStore.compact`;
* :mod:`ablations.storage` -- local paths and URIs, atomic writes (below everything else).

Layout of one sweep (``<sweep_dir>`` is a local folder or a pyarrow URI such as ``s3://b/x``)::

    <sweep_dir>/trials/sweep=<sweep id>/<trial_id>-<uuid>.parquet   one trial row per file
    <sweep_dir>/epochs/sweep=<sweep id>/<trial_id>-<uuid>.parquet   epoch rows of one write

The ``sweep`` column lives in the hive partition folder only (readers such as pandas, polars
and DuckDB add it from the path), and every file carries every known column of its table in the
same order and types (NULL where a value is absent, does not apply to the trial's method, or
was not evaluated that epoch), so a folder reads directly with any of them.

The columns derive from one place each: the run config's fields (:mod:`hardmix.config`, as they
run: :func:`hardmix.config.acts.as_run` NULLs every field that does not act and resolves
``box: auto``),
the run summary and the per-epoch metrics (:mod:`hardmix.metrics`).

Rules that make many writers on many nodes safe without any coordination:

* every write is a new, complete file with a unique name (trial id + uuid4); nothing is ever
  rewritten or appended, so two writers can never clash;
* on a local or network disk the file is written under a hidden temporary name (``.name.tmp``,
  which every Parquet dataset reader skips) and renamed into place, so a killed writer leaves at
  most a hidden temporary file; on object stores (s3://, gs://), where rename is a copy, the file
  is serialised in memory first and sent as one object put, which is all-or-nothing;
* readers deduplicate: the trial row with the latest ``written_at`` wins per (sweep, trial_id),
  the epoch row with the latest ``written_at`` per (sweep, trial_id, epoch). A trial is therefore
  written once as ``running`` when it starts and again with its final status when it ends.

Compaction (:meth:`ResultStore.compact`, ``hardmix compact``) merges the small files into
``compacted-*.parquet`` files of up to :data:`COMPACT_MAX_ROWS` rows, safe while writers run: a
file is deleted only after a published file holds its rows, and a reader whose listed file
vanished lists again (:func:`read_results`); duplicates in between are absorbed by the
deduplication. Compacted rows keep their ``written_at`` and are stored in the current schema.

Reading the folders directly (``pd.read_parquet(<sweep>/trials)``, polars ``read_parquet`` /
``scan_parquet(..., hive_partitioning=True)``, DuckDB ``read_parquet('<sweep>/trials/*/*.parquet',
hive_partitioning = true)``, ``pyarrow.dataset``) works when every file has the same columns,
which holds for files of one hardmix version without extra columns. These readers take the
schema of one file: files of an older version (a ``sweep`` column inside the file, other
columns) make them fail, and extra columns written by a caller are dropped or refused;
``hardmix compact`` rewrites such a folder in the current layout (extras kept), and
``hardmix export`` writes the deduplicated rows as plain files. Direct readers do not
deduplicate: keep the latest ``written_at`` per key (in DuckDB: ``QUALIFY row_number() OVER
(PARTITION BY sweep, trial_id ORDER BY written_at DESC) = 1``).

Schema versions: every row carries the ``schema_version`` it was written with. Files written by an
older known version are migrated when read (see ``MIGRATIONS``); a file with a version this code
does not know stops the reader with an error naming the file.
"""

from __future__ import annotations

from ablations.compaction import (COMPACT_MAX_ROWS, COMPACTED_PREFIX, Compaction,
                                  TableCompaction, compact_table)
from ablations.reader import Results, null_inapplicable, read_results, sweep_roots
from ablations.schema import (FOLLOWUP_PREFIX, KIND_TYPES, KNOWN_VERSIONS, MAIN_PREFIX,
                              MIGRATIONS, SCHEMA_VERSION, STATUSES, TABLES, as_run,
                              config_schema, epoch_schema, parse_trial_id, trial_fields,
                              trial_name, trial_schema, with_pandas_types)
from ablations.storage import STALE_TMP_SECONDS
from ablations.storage import resolve as _resolve  # ablations.report's name for it
from ablations.writer import ResultStore, StoreCallback
from hardmix.errors import ResultsError

__all__ = ["SCHEMA_VERSION", "STATUSES", "KNOWN_VERSIONS", "as_run", "null_inapplicable",
           "MIGRATIONS", "ResultStore", "StoreCallback", "Results", "ResultsError", "read_results",
           "sweep_roots", "config_schema", "trial_schema", "epoch_schema", "Compaction",
           "TableCompaction", "compact_table", "COMPACT_MAX_ROWS", "COMPACTED_PREFIX", "TABLES",
           "KIND_TYPES", "MAIN_PREFIX", "FOLLOWUP_PREFIX", "trial_name", "parse_trial_id",
           "trial_fields", "with_pandas_types", "STALE_TMP_SECONDS", "_resolve"]
