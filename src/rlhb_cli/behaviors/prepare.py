"""`rlhb prepare-behaviors`: raw behaviour logs -> the data set every later stage reads.

Reads and validates the logs (rejected rows are written down with their reason, never dropped in
silence), anonymises user identifiers, bins each behaviour, renders it as text, computes the shaped
reward, splits by query and saves a `datasets` DatasetDict plus the bin edges for reuse.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from rlhb_cli import plots
from rlhb_cli.behaviors import binning
from rlhb_cli.behaviors.read import read_logs
from rlhb_cli.behaviors.text import SHIPPED, BehaviorTemplate
from rlhb_cli.behaviors.validate import validate
from rlhb_cli.config import field
from rlhb_cli.errors import RlhbError
from rlhb_cli.rundir import StageRun, read_json, require_stage, stage_state
from rlhb_cli.storage import atomic_dir, atomic_write_bytes, atomic_write_json

STAGE = "prepare-behaviors"
SPLITS = ("train", "validation", "test")
SEALED = "test"  # queries no training stage reads: the gold-free evaluation's ground
MIN_PREFERRED_SHARE = 0.05


SIMULATED_LOGS = {"simulate-logs": "logs.jsonl", "simulate-conversations": "conversation_logs.jsonl"}


@dataclass
class PrepareConfig:
    logs: Path | None = field(None, help="Log file (.jsonl/.csv/.parquet, .gz too); default: the run's simulated logs "
                                         "(--from-stage).")
    from_stage: str = field("simulate-logs", help="Without a log file, the run's stage whose logs are read: "
                                                  "simulate-logs, or simulate-conversations (one row per turn, the "
                                                  "conversation so far as the query).")
    group_field: str = field("", help="Split by this column instead of the query, every row of a group in one split "
                                      "(e.g. conversation: a conversation's turns never straddle train and test).")
    field_map: list[str] = field(help="Column mapping CANONICAL=YOURS, e.g. likes=upvotes (repeatable).", factory=list)
    input_kind: str = field("auto", help="aggregated rows, impression events, or auto (from the columns).")
    behavior_basis: str = field("rates", help="rates: per-view rates at quantiles beside a per-query view level; "
                                              "counts: the paper's log(1+x) equal-width bins.")
    bins: int = field(5, help="Levels per behaviour metric (the view level under rates has 3).")
    bins_from: Path | None = field(None, help="Reuse the bin edges of an earlier prepare-behaviors (its bins.json).")
    template: str = field("en", help="Behaviour text template: en, zh, or a JSON file of one's own.")
    max_reject_ratio: float = field(0.1, help="Fail when more than this share of rows is rejected or duplicate.")
    max_count: float = field(1e10, help="A count above this is absurd and its row is rejected.")
    require_view: bool = field(True, help="Reject aggregated rows with more clicks, likes or dislikes than views.")
    keep_fields: list[str] = field(help="Other columns to keep (every other column is dropped).", factory=list)
    absent_as_zero: list[str] = field(help="Count columns the logs lack, to take as 0 (e.g. clicks).", factory=list)
    validation_fraction: float = field(0.1, help="Share of queries in the validation split.")
    test_fraction: float = field(0.1, help="Share of queries in the test split.")
    seed: int = field(0, help="Seed of the query split.")
    salt: str | None = field(None, help="Salt for hashing user ids (default: $RLHB_ANON_SALT, else a random one kept "
                                        "in the stage dir as salt.secret).")

    def __post_init__(self):
        if self.from_stage not in SIMULATED_LOGS:
            raise ValueError(f"from_stage must be one of {', '.join(SIMULATED_LOGS)}, got {self.from_stage!r}")
        if self.input_kind not in ("auto", "aggregated", "events"):
            raise ValueError(f"input_kind must be auto, aggregated or events, got {self.input_kind!r}")
        if self.behavior_basis not in ("rates", "counts"):
            raise ValueError(f"behavior_basis must be rates or counts, got {self.behavior_basis!r}")
        if not 2 <= self.bins <= 20:
            raise ValueError(f"bins must be between 2 and 20, got {self.bins}")
        if not 0.0 <= self.max_reject_ratio <= 1.0:
            raise ValueError(f"max_reject_ratio must be in [0, 1], got {self.max_reject_ratio}")
        if self.validation_fraction < 0 or self.test_fraction < 0 or self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction and test_fraction must be >= 0 and leave some queries for training")
        for item in self.field_map:
            if item.count("=") != 1 or not all(item.split("=")):
                raise ValueError(f"--field takes CANONICAL=YOURS (e.g. likes=upvotes), got {item!r}")
        for name in self.absent_as_zero:
            if name not in binning.METRICS:
                raise ValueError(f"absent_as_zero takes count names ({', '.join(binning.METRICS)}), got {name!r}")

    @property
    def mapping(self) -> dict[str, str]:
        return dict(item.split("=") for item in self.field_map)


def _salt(config: PrepareConfig, stage_dir: Path) -> str:
    if config.salt:
        return config.salt
    if os.environ.get("RLHB_ANON_SALT"):
        return os.environ["RLHB_ANON_SALT"]
    secret = stage_dir / "salt.secret"
    if not secret.exists():
        atomic_write_bytes(secret, secrets.token_hex(16).encode())
        secret.chmod(0o600)
    return secret.read_text().strip()


def split_queries(queries: list[str], seed: int, validation: float, test: float) -> dict[str, str]:
    """Each query goes to one split; order by a seeded hash, so a query's split does not depend on the others."""
    return dict(zip(queries, (SPLITS[c] for c in split_codes(queries, seed, validation, test))))


def split_codes(queries: list[str], seed: int, validation: float, test: float) -> np.ndarray:
    """`split_queries` as each query's index in SPLITS (int8), sorted in numpy: a million rows compare small
    integers, not strings. The hash's 8 bytes read big-endian order as the bytes do, and the sort is stable."""
    seeded = hashlib.blake2b(f"{seed}\0".encode(), digest_size=8)  # each query's hash continues a copy of it
    digests = bytearray()
    for query in queries:
        hashed = seeded.copy()
        hashed.update(query.encode())
        digests += hashed.digest()
    ranked = np.argsort(np.frombuffer(digests, dtype=">u8"), kind="stable")
    n = len(queries)
    n_test = int(round(n * test))
    n_val = int(round(n * validation))
    if n >= 3:  # every split non-empty whenever there are queries enough
        n_test = max(n_test, 1 if test > 0 else 0)
        n_val = max(n_val, 1 if validation > 0 else 0)
    codes = np.zeros(n, dtype=np.int8)  # train
    codes[ranked[:n_test]] = SPLITS.index("test")
    codes[ranked[n_test:n_test + n_val]] = SPLITS.index("validation")
    return codes


@contextlib.contextmanager
def _large_write_batches(datasets_module):
    """datasets writes 1,000 rows per batch by default; 100,000 at a time writes a large set ~2x faster."""
    saved = datasets_module.config.DEFAULT_MAX_BATCH_SIZE
    datasets_module.config.DEFAULT_MAX_BATCH_SIZE = 100_000
    try:
        yield
    finally:
        datasets_module.config.DEFAULT_MAX_BATCH_SIZE = saved


def _take(table: pa.Table, indices: pa.Array) -> pa.Table:
    """`table.take(indices)` a column per thread: Arrow takes one column at a time, on one core."""
    with concurrent.futures.ThreadPoolExecutor(min(table.num_columns, os.cpu_count() or 1)) as pool:
        columns = list(pool.map(lambda column: column.take(indices), table.columns))
    return pa.table(columns, schema=table.schema)


def _reason_class(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0]


def run(config: PrepareConfig, stage: StageRun) -> dict:
    logs = config.logs
    if logs is None:
        raise RlhbError("no LOGS given and the run has no simulate-logs output")
    logs = Path(logs)
    if not logs.is_file():
        raise RlhbError(f"{logs}: no such file" if not logs.exists() else f"{logs}: is not a file")
    template = BehaviorTemplate.load(config.template)
    # The logs' hash for the manifest is taken on another thread while they are parsed (both let go of the GIL).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hashing = pool.submit(stage.add_input, "logs", logs)
        parsed = read_logs(logs, config.mapping)
        hashing.result()
    if config.template not in SHIPPED:
        stage.add_input("template", Path(config.template))
    # The histogram PNG's child starts now, importing matplotlib on the other core while this one validates.
    with plots.Drawing("histograms", stage.dir / "histograms.png") as plotting:
        return _prepare(config, stage, logs, template, parsed, plotting)


def _prepare(config: PrepareConfig, stage: StageRun, logs: Path, template: BehaviorTemplate, parsed,
             plotting: plots.Drawing) -> dict:
    """Validate, split, bin, render and write what `run` parsed; the histograms are handed to `plotting`."""
    keep = config.keep_fields + ([config.group_field] if config.group_field not in ("", *config.keep_fields) else [])
    checked = validate(parsed, logs, config.input_kind, config.max_count, config.require_view, keep,
                       config.absent_as_zero, _salt(config, stage.dir), config.group_field)
    rejected_lines = [json.dumps(r.to_json() | {"kind": "rejected"}, ensure_ascii=False) for r in checked.rejected]
    rejected_lines += [json.dumps(r.to_json() | {"kind": "duplicate"}, ensure_ascii=False) for r in checked.duplicates]
    atomic_write_bytes(stage.dir / "rejected.jsonl", ("\n".join(rejected_lines) + ("\n" if rejected_lines else "")).encode())
    n_bad = len(checked.rejected) + len(checked.duplicates)
    assert checked.rows_in == checked.rows_kept + n_bad, "row accounting must reconcile"
    if checked.rows_in and n_bad / checked.rows_in > config.max_reject_ratio:
        first = (checked.rejected or checked.duplicates)[0]
        raise RlhbError(f"{logs}: {n_bad} of {checked.rows_in} rows are bad ({n_bad / checked.rows_in:.1%}), more than "
                        f"--max-reject-ratio {config.max_reject_ratio}; first: line {first.line}: {first.reason}; "
                        f"all in {stage.dir / 'rejected.jsonl'}")
    table = checked.table
    if table.num_rows == 0:
        raise RlhbError(f"{logs}: no row is usable; see {stage.dir / 'rejected.jsonl'}")

    # Split by query, then fit the bins on the training rows only (no test information in the edges).
    encoded = table.column("query").combine_chunks().dictionary_encode()
    query_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    unique_queries = encoded.dictionary.to_pylist()
    if config.group_field:
        if config.group_field not in table.column_names:
            raise RlhbError(f"{logs}: --group-field {config.group_field!r} is not a column of the logs")
        groups = table.column(config.group_field).cast(pa.string()).combine_chunks().dictionary_encode()
        unique_groups = groups.dictionary.to_pylist()
        row_split = split_codes(unique_groups, config.seed, config.validation_fraction,
                                config.test_fraction)[groups.indices.to_numpy(zero_copy_only=False)]
    else:
        row_split = split_codes(unique_queries, config.seed, config.validation_fraction, config.test_fraction)[query_codes]
    in_split = {name: row_split == i for i, name in enumerate(SPLITS)}
    # a query's split (under groups, the same question may open conversations in several: the test one wins)
    split_names = np.full(len(unique_queries), "train", dtype=object)
    for name in ("validation", SEALED):
        split_names[query_codes[in_split[name]]] = name
    counts = {m: table.column(m).to_numpy() for m in binning.METRICS}
    if config.bins_from is not None:
        stage.add_input("bins_from", Path(config.bins_from))
        spec = binning.BinSpec.from_json(read_json(Path(config.bins_from)))
        if spec.basis != config.behavior_basis:
            raise RlhbError(f"{config.bins_from}: its bins are on the {spec.basis} basis, not {config.behavior_basis}")
    else:
        train = in_split["train"]
        spec = binning.fit_bins(config.behavior_basis, config.bins, *(counts[m][train] for m in binning.METRICS),
                                query_codes[train])
    bins = binning.apply_bins(spec, *(counts[m] for m in binning.METRICS), query_codes)
    codes = binning.pattern_codes(spec, bins)
    unique_codes, unique_texts = template.render_codes(spec, codes)
    text_index = np.searchsorted(unique_codes, codes).astype(np.int32)
    reward = binning.shaped_reward(*(counts[m] for m in binning.METRICS))
    zero_denominator = int(((counts["pv"] + counts["clicks"]) == 0).sum())
    best = binning.most_preferred_levels(spec)
    # The histogram PNG is drawn by the child, as soon as its numbers are known, while this process orders the
    # rows and writes the data set (the drawing, not this process, is the stage's last step otherwise).
    atomic_write_json(stage.dir / "histograms.json", _histogram_data(counts, reward, spec))
    plotting.draw(stage.dir / "histograms.json")
    is_best = np.ones(len(codes), dtype=bool)
    for m in binning.METRICS:
        is_best &= bins[m] == best[m]

    # Rows grouped by split (each split's rows in their order) with one take, so each split is a slice of one table.
    order = np.argsort(row_split, kind="stable")
    table = _take(table, pa.array(order))
    for m in binning.METRICS:
        table = table.append_column(f"{m}_bin", pa.array(bins[m][order]))
    # the behaviour text as strings once, after the rows are ordered: its few distinct texts are looked up by index
    table = table.append_column("behavior_text", pa.DictionaryArray.from_arrays(
        pa.array(text_index[order]), pa.array(unique_texts.tolist(), pa.string())).cast(pa.string()))
    table = table.append_column("shaped_reward", pa.array(reward[order]))
    table = table.append_column("is_most_preferred", pa.array(is_best[order]))
    bounds = np.cumsum([0] + [int(in_split[name].sum()) for name in SPLITS])

    datasets.disable_progress_bars()
    table = table.combine_chunks()  # one chunk per column: a split is a zero-copy slice of it
    with _large_write_batches(datasets), atomic_dir(stage.dir / "dataset") as tmp:
        # A fingerprint from what made the data, so datasets need not hash a million rows to invent one.
        made_of = hashlib.sha256(json.dumps([stage.manifest["inputs"], stage.manifest["config"]], sort_keys=True,
                                            default=str).encode()).hexdigest()[:16]
        parts = {name: datasets.Dataset(table.slice(bounds[i], bounds[i + 1] - bounds[i]),
                                        fingerprint=f"{made_of}-{name}") for i, name in enumerate(SPLITS)}
        # One shard at least per split, so that an empty split (e.g. --test-fraction 0) loads back.
        shards = {name: max(1, -(-len(part) // 500_000)) for name, part in parts.items()}
        datasets.DatasetDict(parts).save_to_disk(str(tmp), num_shards=shards)
    atomic_write_json(stage.dir / "bins.json", spec.to_json())
    most_preferred_text = template.most_preferred(spec)
    atomic_write_json(stage.dir / "behavior.json", {
        "template": template.source, "language": template.language, "format": template.format,
        "most_preferred_levels": best, "most_preferred_text": most_preferred_text,
    })
    plotting.wait_for()

    reasons = collections.Counter(_reason_class(r.reason) for r in checked.rejected)
    train_mask = in_split["train"]
    share_train = float(is_best[train_mask].mean()) if train_mask.any() else 0.0
    summary = {
        "logs": str(logs),
        "input_kind": checked.kind,
        "rows_in": checked.rows_in,
        "rows_kept": checked.rows_kept,
        "rows_rejected": len(checked.rejected),
        "rows_duplicate": len(checked.duplicates),
        "rows_out": table.num_rows,
        "reject_reasons": dict(reasons.most_common()),
        "splits": {s: {"rows": int(in_split[s].sum()),
                       "queries": int(np.bincount(query_codes[in_split[s]], minlength=1).astype(bool).sum())}
                   for s in SPLITS},
        "sealed": {"split": SEALED,
                   "queries_sha256": queries_digest(q for q, s in zip(unique_queries, split_names) if s == SEALED),
                   "read_by": "evaluate only: every training stage is refused it (load_prepared)"},
        "behavior_basis": spec.basis,
        "levels": {m: spec.levels(m) for m in binning.METRICS},
        "most_preferred_text": most_preferred_text,
        "most_preferred_share": round(float(is_best.mean()), 4),
        "most_preferred_share_train": round(share_train, 4),
        "shaped_reward_mean": round(float(reward.mean()), 4),
        "shaped_reward_mean_most_preferred": round(float(reward[is_best].mean()), 4) if is_best.any() else None,
        "shaped_reward_zero_denominator_rows": zero_denominator,
        "dropped_columns": checked.dropped_columns,
        "notes": checked.notes,
        "warnings": [],
    }
    if share_train < MIN_PREFERRED_SHARE:
        summary["warnings"].append(
            f"the most preferred behaviour text describes {share_train:.1%} of training rows (< {MIN_PREFERRED_SHARE:.0%}): "
            f"the condition RLHB asks for was rarely seen; consider "
            + ("--behavior-basis rates" if spec.basis == "counts" else "fewer --bins") + " or more traffic per row")
    return summary


def _histogram_data(counts: dict[str, np.ndarray], reward: np.ndarray, spec: binning.BinSpec) -> dict:
    panels = []
    for m in binning.METRICS:
        hist, edges = np.histogram(np.log1p(counts[m]), bins=40)
        panels.append({"title": f"log(1 + {m})", "counts": hist.tolist(), "edges": edges.tolist(),
                       "bin_edges": spec.edges[m] if spec.basis == "counts" else []})
    hist, edges = np.histogram(reward, bins=40)
    panels.append({"title": "shaped reward", "counts": hist.tolist(), "edges": edges.tolist(), "color": "#228833"})
    return {"panels": panels}


def queries_digest(queries) -> str:
    """sha256 of a set of queries (sorted, NUL-separated): what a manifest records of the sealed split."""
    return hashlib.sha256("\0".join(sorted(queries)).encode()).hexdigest()


class TrainingSplits(dict):
    """A training stage's view of the data: the train and validation splits; the sealed split is refused."""

    def __init__(self, data, where: Path):
        super().__init__({name: data[name] for name in data if name != SEALED})
        self.where = where

    def __missing__(self, name: str):
        if name == SEALED:
            raise RlhbError(f"{self.where}: the {SEALED} split is sealed: no training stage reads it (only evaluate)")
        raise KeyError(name)


def sealed_queries(run_dir: Path) -> set[str]:
    """The sealed split's query texts (nothing else of it), for a stage with data of its own (preference pairs)
    to leave them out; empty when the run has no prepare-behaviors done."""
    prepared = Path(run_dir) / STAGE
    if stage_state(prepared)[0] != "done":
        return set()
    return set(datasets.load_from_disk(str(prepared / "dataset" / SEALED)).unique("query"))


def load_prepared(run_dir: Path, stage: StageRun, min_validation: int = 1, sealed: bool = False):
    """(splits, BinSpec, template) of the run's prepare-behaviors, recorded as this stage's upstream. Without
    `sealed` (every training stage) the test split is left out and refused; evaluate asks for it. The splits
    read are written in the stage's manifest, so evaluate can show that no training stage read the sealed one."""
    datasets.disable_progress_bars()
    prepared = require_stage(run_dir, STAGE)
    stage.add_upstream(STAGE)
    data = datasets.load_from_disk(str(prepared / "dataset"))
    if not sealed:
        data = TrainingSplits(data, prepared / "dataset")
    stage.manifest["splits_read"] = sorted(data)
    if len(data["train"]) == 0:
        raise RlhbError(f"{prepared}: the training split is empty; prepare-behaviors needs more queries")
    if len(data["validation"]) < min_validation:
        raise RlhbError(f"{prepared}: the validation split has {len(data['validation'])} rows, too few to measure "
                        f"anything; rerun prepare-behaviors with more logs or a larger --validation-fraction")
    spec = binning.BinSpec.from_json(read_json(prepared / "bins.json"))
    behavior = read_json(prepared / "behavior.json")
    source = behavior["template"]
    template = BehaviorTemplate.load(source.split(":", 1)[1] if source.startswith("shipped:") else source)
    return data, spec, template
