"""`rlhfkit annotate-import`: turn annotation exports into rlhfkit records (docs/schema.md).

Everything is read and converted in memory first; the output directory is created and
written only once every input row converted (or, with --skip-invalid, was set aside), so a
bad input leaves it untouched. Output is deterministic: ids come from the input position,
records keep the input order, and neither the JSONL files nor the report hold timestamps.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhfkit.config import DEFAULT_SEED, REQUIRED, opt
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.importers import (
    Importer,
    ImportOptions,
    Skipped,
    critique,
    doccano,
    helpsteer2,
    helpsteer3,
    label_studio,
    math_shepherd,
    pairwise,
    parse_field_map,
    parse_label_map,
    prm800k,
    qa_feedback,
    read_rows,
    resolve_labels,
    source_names,
    ultrafeedback,
)
from rlhfkit.io import write_json
from rlhfkit.runs import OVERWRITE_HELP, RunDir, progress_bar
from rlhfkit.schema import (
    Preference,
    Record,
    RecordError,
    SpanFeedback,
    check_record_size,
    validate_record,
    write_records,
)

FORMATS: dict[str, Importer] = {
    "qa-feedback": qa_feedback.IMPORTER,
    "pairwise": pairwise.IMPORTER,
    "critique": critique.IMPORTER,
    "doccano": doccano.IMPORTER,
    "label-studio": label_studio.IMPORTER,
    "helpsteer2": helpsteer2.IMPORTER,
    "helpsteer3": helpsteer3.IMPORTER,
    "ultrafeedback": ultrafeedback.IMPORTER,
    "prm800k": prm800k.IMPORTER,
    "math-shepherd": math_shepherd.IMPORTER,
}

OUTPUT_FILES = {
    "prompt": "prompts.jsonl",
    "demonstration": "demonstrations.jsonl",
    "span_feedback": "span_feedback.jsonl",
    "preference": "preferences.jsonl",
    "critique": "critiques.jsonl",
    "score": "scores.jsonl",
}
"""One file per record type; the order here is the order of the report's counts."""

REPORT = "import_report.json"


@dataclass
class ImportConfig:
    format: str = opt(REQUIRED, f"Input format: {', '.join(FORMATS)}.", panel="Data")
    inputs: list[str] = opt(
        REQUIRED,
        "Input files (JSON list or JSONL), .parquet files, datasets saved with save_to_disk, or hf:NAME.",
        argument=True,
        panel="Data",
    )
    out: str = opt(REQUIRED, "Output directory.", panel="Output")
    overwrite: bool = opt(False, OVERWRITE_HELP, panel="Output")
    label_map: Optional[str] = opt(
        None,
        "Labels to aspects: LABEL=ASPECT,... or a JSON/YAML file (qa-feedback, doccano, label-studio).",
        panel="Data",
    )
    field: list[str] = opt(
        [], "Rename an input field: NAME=INPUT_FIELD (repeatable, or comma-separated).",
        panel="Data",
    )
    split: str = opt(
        "train", "Split of a Hugging Face dataset (hf:NAME[:CONFIG] or a save_to_disk DatasetDict).",
        panel="Data",
    )
    pairs: Optional[str] = opt(
        None, "Which preference pairs of several rated responses (ultrafeedback): all (default; at most 16 completions "
        "per row) or best-vs-worst.",
        panel="Data",
    )
    skip_invalid: bool = opt(
        False, "Skip invalid records (listed in import_report.json) instead of stopping.",
        panel="Data",
    )
    seed: int = opt(DEFAULT_SEED, "Recorded in run_config.json; the import itself uses no randomness.", panel="Training")

    def validate(self) -> None:
        self.options()

    def options(self) -> ImportOptions:
        """The parsed --label-map and --field for this format (bad values raise RlhfkitError)."""
        if self.format not in FORMATS:
            raise RlhfkitError(
                f"unknown --format {self.format!r}; valid formats: {', '.join(FORMATS)}"
            )
        importer = FORMATS[self.format]
        if self.pairs is not None and self.pairs not in importer.pairs:
            raise RlhfkitError(
                f"--pairs {self.pairs!r}: valid for --format {self.format}: {', '.join(importer.pairs)}"
                if importer.pairs
                else f"--pairs does not apply to --format {self.format}"
            )
        return ImportOptions(
            labels=resolve_labels(parse_label_map(self.label_map), importer.labels, self.format),
            fields=parse_field_map(self.field, importer.fields, self.format),
            pairs=self.pairs or (importer.pairs[0] if importer.pairs else "all"),
        )


def run_import(cfg: ImportConfig) -> dict:
    """Import annotations (QA-Feedback, pairwise, critique, doccano, Label Studio, HelpSteer2/3,
    UltraFeedback, PRM800K, Math-Shepherd) as rlhfkit records.

    Writes one JSONL file per record type produced, import_report.json (counts, skipped and
    invalid records with their locations) and run_config.json. Returns the report.
    """
    importer = FORMATS[cfg.format]
    options = cfg.options()
    records: list[Record] = []
    skipped: list[dict] = []
    invalid: list[dict] = []
    inputs = []
    with progress_bar(f"importing {cfg.format}", total=None) as advance:
        for spec, name in zip(cfg.inputs, source_names(cfg.inputs)):
            rows = 0
            for row in read_rows(spec, name, cfg.split):
                rows += 1
                advance()
                try:
                    if row.error:
                        raise RecordError(row.error)
                    converted = list(importer.convert(row, options))
                    for item in converted:
                        if not isinstance(item, Skipped):
                            validate_record(item)
                            check_record_size(item)
                except RecordError as err:
                    if not cfg.skip_invalid:
                        raise RlhfkitError(f"{row.where}: {err}") from None
                    invalid.append({"where": row.where, "reason": str(err)})
                    continue
                for item in converted:
                    if isinstance(item, Skipped):
                        skipped.append({"where": item.where, "reason": item.reason})
                    else:
                        records.append(item)
            inputs.append({"input": spec, "rows": rows})
    if importer.finish is not None:
        importer.finish(records)
    if not records:
        detail = (
            f"; first invalid: {invalid[0]['where']}: {invalid[0]['reason']}" if invalid else ""
        )
        raise RlhfkitError(
            f"{', '.join(cfg.inputs)}: no records to import ({len(invalid)} invalid{detail})"
        )

    report = import_report(cfg.format, inputs, records, skipped, invalid)
    run = RunDir(cfg.out, "annotate-import", cfg)
    by_type = collections.defaultdict(list)
    for record in records:
        by_type[record.type_name].append(record)
    # Every file is written into a staging directory first and moved in (with run_config.json
    # written just before) only when all are whole: a write that fails (a full disk) never
    # leaves --out holding some of the files, which would block the re-run.
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=run.path))
    try:
        for type_name, records_of_type in by_type.items():
            write_records(staging / OUTPUT_FILES[type_name], records_of_type)
        write_json(staging / REPORT, report)
        run.begin()
        for type_name, file_name in OUTPUT_FILES.items():
            path = run.path / file_name
            if type_name in by_type:
                os.replace(staging / file_name, path)
            elif path.exists():
                path.unlink()  # left by an earlier import into the same directory
        os.replace(staging / REPORT, run.path / REPORT)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(
        f"imported {', '.join(f'{n} {t}' for t, n in report['counts'].items())} into {cfg.out} "
        f"({len(skipped)} skipped, {len(invalid)} invalid; see {REPORT})"
    )
    return report


def import_report(
    format_name: str,
    inputs: list[dict],
    records: list[Record],
    skipped: list[dict],
    invalid: list[dict],
) -> dict:
    """What an import produced: counts per type, per aspect and label, and what it left out."""
    types = collections.Counter(record.type_name for record in records)
    feedback = [r for r in records if isinstance(r, SpanFeedback)]
    preferences = [r for r in records if isinstance(r, Preference)]
    spans = [span for record in feedback for span in record.spans]
    report = {
        "format": format_name,
        "inputs": inputs,
        "counts": {t: types[t] for t in OUTPUT_FILES if types[t]},
        "files": {t: OUTPUT_FILES[t] for t in OUTPUT_FILES if types[t]},
    }
    if feedback:
        report["span_feedback"] = {
            "spans_per_aspect": dict(sorted(collections.Counter(s.aspect for s in spans).items())),
            "spans_per_label": dict(sorted(collections.Counter(s.label for s in spans).items())),
            "responses_without_spans": sum(1 for r in feedback if not r.spans),
        }
    if preferences:
        report["preference"] = {
            "per_aspect": dict(
                sorted(collections.Counter(p.aspect or "(none)" for p in preferences).items())
            ),
            "ties": sum(1 for p in preferences if p.tie),
        }
    report["skipped"] = skipped
    report["invalid"] = invalid
    return report
