"""`textmill clean`: a raw corpus -> data/clean/<corpus>/ (docs + rejected) and reports/clean/<corpus>{.json,-drops.csv}.

Two ways in: a configured corpus (`textmill clean abstracts`, the DVC stage) or ad hoc files (`textmill clean --raw PATH
--out DIR`). Records stream from the readers in chunks to worker processes (repairs, filters, language, signatures);
the parent takes results back in input order and decides duplicates, so output is deterministic for any worker count.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from textmill.pipelines import clean_worker
from textmill.pipelines.clean_worker import Outcome, Settings
from textmill.pipelines.clean_writer import CorpusWriter
from textmill.pipelines.readers import RawCorpus, ReadOptions, Record, resolve
from textmill.pipelines.steps.base import Tally
from textmill.pipelines.steps.exact_dup import ExactDedup
from textmill.pipelines.steps.language import Language
from textmill.pipelines.steps.near_dup import NearDedup
from textmill import config as tconfig
from textmill.config import CleanConfig, CorpusConfig, CsvConfig
from textmill.errors import UserError
from textmill.storage import atomic_path, is_local, write_json_atomic, write_text_atomic
from textmill.system import available_cpus

log = logging.getLogger(__name__)

LANGUAGE_REASONS = ("no_language", "wrong_language", "low_confidence")
DROP_REASONS = ("malformed_row", "malformed_json", "missing_field", "empty", "too_short", "too_long", "duplicate",
                "near_duplicate", "no_language", "wrong_language", "low_confidence")


def settings_for(corpus: CorpusConfig, clean: CleanConfig) -> Settings:
    unknown = [s for s in corpus.steps if s not in clean_worker.CORPUS_STEPS]
    if unknown:
        raise UserError(f"corpus steps {unknown} are unknown; choose from {sorted(clean_worker.CORPUS_STEPS)}")
    return Settings(template=corpus.text, required=tuple(corpus.required), steps=tuple(corpus.steps),
                    fix_html=clean.fix_html, min_chars=corpus.min_chars, max_chars=corpus.max_chars,
                    detector=clean.detector, seed=clean.seed, near_dup=clean.near_dup.enabled,
                    num_perm=clean.near_dup.num_perm, ngram=clean.near_dup.ngram,
                    full_rejected_text=clean.rejected_text == "full")


def read_options(corpus: CorpusConfig) -> ReadOptions:
    """The reader's view of a corpus config. A raw record may take up to 4 x `max_chars` + 64 Ki characters while it is
    read (markup, other fields); past that it is dropped as `too_long` without being held whole."""
    return ReadOptions(format=corpus.format, split=corpus.split, encoding=corpus.encoding, template=corpus.text,
                       id_field=corpus.id, required=tuple(corpus.required), csv=dict(vars(corpus.csv)),
                       include=tuple(corpus.include), exclude=tuple(corpus.exclude),
                       record_limit=4 * corpus.max_chars + (1 << 16))


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def outcomes(records: Iterable[Record], settings: Settings, workers: int, chunk_size: int) -> Iterator[Outcome]:
    """Per-document results in input order. At most 2 chunks per worker are in flight, so memory stays bounded."""
    chunks = _chunks(records, chunk_size)
    if workers <= 1:
        clean_worker.init(settings)
        for chunk in chunks:
            yield from clean_worker.process_chunk(chunk)
        return
    with ProcessPoolExecutor(workers, initializer=clean_worker.init,
                             initargs=(settings, os.getpid())) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(clean_worker.process_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def decide(stream: Iterable[Outcome], corpus: CorpusConfig, clean: CleanConfig, writer: CorpusWriter) -> Tally:
    """The parent's half: duplicates (first occurrence in input order kept), then language; write every outcome.
    A duplicate's rejection names the id it repeats; a language rejection carries the detector's distribution."""
    tally = Tally()
    exact = ExactDedup()
    near = NearDedup(clean.near_dup.threshold, clean.near_dup.num_perm) if clean.near_dup.enabled else None
    threshold = clean.fasttext_threshold if clean.detector == "fasttext" else clean.lang_threshold
    language = Language(corpus.lang, threshold)
    full = clean.rejected_text == "full"
    for out in tqdm(stream, desc="clean", unit="doc", disable=None, mininterval=1.0):
        doc = out.doc
        tally.seen(doc)
        reason, excerpt, original = out.reason, out.excerpt, None
        if reason is None:
            if (original := exact.original(doc)) is not None:
                reason = "duplicate"
            elif near and (original := near.original(doc)) is not None:
                reason = "near_duplicate"
            else:
                reason = language.keep(doc)
            excerpt = doc.text if full else doc.text[:clean_worker.EXCERPT_CHARS]
            if reason is None and near:
                near.add(doc)  # only kept documents make later ones near-duplicates
        if reason:
            tally.dropped(reason)
            writer.reject(doc, reason, excerpt, original, doc.langs if reason in LANGUAGE_REASONS else None)
        else:
            tally.kept(doc)
            writer.doc(doc)
    return tally


OVERSUBSCRIBE = 4  # at most this many workers per usable CPU: more only fork processes that wait for a core


def worker_count(configured: int) -> int:
    """`clean.workers` (0 = one per CPU this process may use, not the host's: `textmill.system.available_cpus`), capped at OVERSUBSCRIBE per CPU: the
    pool forks every worker up front, so `clean.workers=100000` (a typo, or a units mix-up) forked until the machine
    stalled. A capped value is logged."""
    cpus = available_cpus()
    if configured <= 0:
        return cpus
    if configured > OVERSUBSCRIBE * cpus:
        log.warning("clean.workers=%d is more than %d per CPU on this machine (%d usable); using %d", configured,
                    OVERSUBSCRIBE, cpus, OVERSUBSCRIBE * cpus)
        return OVERSUBSCRIBE * cpus
    return configured


def clean_files(files: list[tuple[Path, str]], corpus: CorpusConfig, clean: CleanConfig, out_dir: Path,
                name: str) -> tuple[dict, dict]:
    """Clean `files` (path, id label) as one corpus into `out_dir` (replaced atomically). Returns (report, timings)."""
    start = time.perf_counter()
    settings = settings_for(corpus, clean)
    opts = read_options(corpus)
    workers = worker_count(clean.workers)
    bytes_in = sum(p.stat().st_size for p, _ in files)
    with RawCorpus(files, opts) as raw, atomic_path(out_dir) as tmp:  # every input checked before any work
        writer = CorpusWriter(tmp, clean.output_format)
        try:
            tally = decide(outcomes(raw.records(), settings, workers, clean.chunk_size), corpus, clean, writer)
        finally:
            writer.close()
        if tally.docs_in == 0:
            raise UserError(f"corpus {name!r}: no records in {[label for _, label in files]}; "
                            "check the files' content and the `format:`/`split:` settings")
        bytes_out = writer.docs_path.stat().st_size
    seconds = time.perf_counter() - start
    report = {
        "corpus": name, "detector": clean.detector, "files": len(files), "bytes_in": bytes_in, "bytes_out": bytes_out,
        "docs_in": tally.docs_in, "docs_out": tally.docs_out,
        "drops": dict(sorted(tally.drops.items())), "fixes": dict(sorted(tally.fixes.items())),
        "languages": dict(sorted(tally.languages.items())),
        "skipped_files": dict(sorted(raw.skipped.items())), "dialects": raw.dialects, "encodings": raw.encodings,
    }
    timings = {"seconds": round(seconds, 3), "workers": workers, "docs_per_s": round(tally.docs_in / seconds, 1),
               "mb_per_s": round(bytes_in / 1e6 / seconds, 3)}
    if tally.docs_out == 0:
        log.warning("corpus %s: every document was dropped; see %s/rejected.jsonl", name, out_dir)
    return report, timings


def drops_csv(report: dict) -> str:
    """`reason,count` for the reasons that dropped something (zero-count reasons left out), in a fixed order: the DVC
    bar plot (titled with its corpus in dvc.yaml) shows only real drops."""
    reasons = [r for r in DROP_REASONS if r in report["drops"]] + sorted(set(report["drops"]) - set(DROP_REASONS))
    return "reason,count\n" + "".join(f"{r},{report['drops'][r]}\n" for r in reasons if report["drops"][r])


def run_configured(name: str, params: str, overrides: list[str]) -> dict:
    """The DVC stage: corpus `name` from params.yaml -> {paths.clean}/<name>/ and {paths.reports}/clean/<name>*."""
    cfg = tconfig.load(params, overrides)
    corpus = cfg.corpus(name)
    _local_only(cfg.paths.raw, "paths.raw")
    root = Path(cfg.paths.raw) / name
    files = [(p, p.relative_to(root).as_posix()) for p in resolve(root, corpus.files)]
    report, timings = clean_files(files, corpus, cfg.clean, Path(cfg.paths.clean) / name, name)
    reports = Path(cfg.paths.reports) / "clean"
    write_json_atomic(reports / f"{name}.json", report)
    write_text_atomic(reports / f"{name}-drops.csv", drops_csv(report))
    write_json_atomic(reports / f"{name}-timings.json", timings)
    return report


def _local_only(uri: str, where: str) -> None:
    """`clean` reads local files (archives in place); a remote URI gets one line saying how to bring it here."""
    if not is_local(uri):
        raise UserError(f"{where} {uri}: clean reads local files; copy it here first (`gsutil cp -r {uri} data/raw/"
                        "<name>/`, `curl -LO`, or `dvc pull` for a DVC-tracked corpus) and point at the copy")


def _adhoc_files(paths: list[str]) -> list[tuple[Path, str]]:
    """Files named on the command line, in the given order; a folder contributes its files (sorted, recursive)."""
    files: list[tuple[Path, str]] = []
    for raw in paths:
        _local_only(raw, "--raw")
        path = Path(raw)
        try:
            path.stat()
        except FileNotFoundError:
            pass
        except OSError as e:  # a symlink loop (ELOOP), no permission
            raise UserError(f"{path}: cannot open it ({e.strerror}); point --raw at the real file or folder") from None
        if path.is_dir():
            files += [(p, p.relative_to(path).as_posix()) for p in resolve(path, ["**/*"])]
        elif path.is_file():
            files.append((path, path.name))
        elif path.exists():  # a device (/dev/zero), a FIFO or a socket: never read (it may not end)
            raise UserError(f"{path}: not a regular file or folder (a device, FIFO or socket); save the data to a file "
                            "and point --raw at it")
        else:
            raise UserError(f"{path}: no such file or folder; check the --raw path")
    return files


def _check_out(out: Path, raws: list[str]) -> Path:
    """The output folder is replaced whole, so it must not overlap an input or hold anything but a previous clean."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a folder; the clean corpus is a folder: choose a new or "
                        "empty folder path")
    out = out.resolve()
    for raw in raws:
        src = Path(raw).resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise UserError(f"--out {out} overlaps --raw {src}; write the clean corpus to a separate folder "
                            f"(e.g. data/clean/<name>); raw files are never written")
    if out.is_dir() and any(out.iterdir()):
        held = {p.name for p in out.iterdir()}
        if not held & {"docs.jsonl", "docs.parquet"}:
            raise UserError(f"--out {out} is a non-empty folder that holds no clean corpus; it would be replaced whole: "
                            f"choose a new or empty folder")
        # a docs.jsonl is not enough: `--out .` in a project folder that happens to hold one deleted everything else
        if others := sorted(held - CLEAN_OUTPUTS):
            raise UserError(f"--out {out} holds a clean corpus but also {len(others)} other entr"
                            f"{'y' if len(others) == 1 else 'ies'} ({', '.join(map(repr, others[:3]))}"
                            f"{', ...' if len(others) > 3 else ''}) that replacing the folder would delete; move them "
                            f"out or choose a new or empty folder")
    return out


CLEAN_OUTPUTS = {"docs.jsonl", "docs.parquet", "rejected.jsonl", "report.json"}  # what a clean writes into --out


def run_adhoc(args: argparse.Namespace) -> dict:
    cfg = tconfig.from_container(tconfig.OmegaConf.from_dotlist(list(args.overrides)))
    dialect = CsvConfig(delimiter=args.delimiter, quotechar=args.quotechar, escapechar=args.escapechar,
                        doublequote=args.doublequote, quoting=args.quoting, header=args.header, comment=args.comment)
    corpus = CorpusConfig(format=args.format, text=args.text, id=args.id, split=args.split, encoding=args.encoding,
                          lang=[x for v in args.lang for x in v.split(",") if x], min_chars=args.min_chars,
                          max_chars=args.max_chars, required=list(args.required), include=list(args.include),
                          exclude=list(args.exclude), csv=dialect)
    tconfig.check_length_bounds(corpus, "--min-chars", "--max-chars")
    if args.detector:
        cfg.clean.detector = args.detector
        tconfig.validate(cfg)
    files = _adhoc_files(args.raw)  # first: it names unreadable paths (a symlink loop) that resolving would trip on
    out = _check_out(Path(args.out), args.raw)
    report, timings = clean_files(files, corpus, cfg.clean, out, out.name)
    write_json_atomic(out / "report.json", report)
    log.info("cleaned %d -> %d docs in %.1f s", report["docs_in"], report["docs_out"], timings["seconds"])
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = CorpusConfig()
    p = argparse.ArgumentParser(prog="textmill clean", description=__doc__.split("\n")[0])
    p.add_argument("corpus", nargs="?", help="configured corpus name (configs/corpus/<name>.yaml)")
    tconfig.add_cli_arguments(p, "clean.workers=1")
    adhoc = p.add_argument_group("ad hoc (no config file): --raw PATH... --out DIR")
    adhoc.add_argument("--raw", nargs="+", help="files or folders, one corpus (dedup across them, first kept)")
    adhoc.add_argument("--out", help="output folder: docs.jsonl, rejected.jsonl, report.json")
    adhoc.add_argument("--format", default=defaults.format, help="input format: auto|csv|tsv|json|jsonl|txt|parquet")
    adhoc.add_argument("--text", default=defaults.text, help='template over record fields, e.g. "{title}\\n\\n{abstract}"')
    adhoc.add_argument("--id", default=None, help="id field (default: <file>:<row>)")
    adhoc.add_argument("--split", default=defaults.split, help="txt files: file | paragraph | a separator line")
    adhoc.add_argument("--encoding", default=defaults.encoding)
    adhoc.add_argument("--required", action="append", default=[], help="field that must be non-blank (repeatable)")
    adhoc.add_argument("--lang", action="append", default=[], help="language(s) to keep, e.g. en or en,de (default: all)")
    adhoc.add_argument("--min-chars", type=int, default=defaults.min_chars)
    adhoc.add_argument("--max-chars", type=int, default=defaults.max_chars)
    adhoc.add_argument("--include", action="append", default=[], metavar="GLOB",
                       help="keep only files / archive members matching (repeatable), e.g. '*train.csv'")
    adhoc.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="leave out files / archive members matching (repeatable), e.g. '*sample_submission*'")
    dialect = p.add_argument_group("CSV/TSV dialect (default: sniffed per file, recorded in report.json)")
    dialect.add_argument("--delimiter", help="field separator, e.g. ';' or '\\t'")
    dialect.add_argument("--quotechar")
    dialect.add_argument("--escapechar", help="e.g. '\\' for backslash-escaped quotes")
    dialect.add_argument("--no-doublequote", dest="doublequote", action="store_const", const=False, default=None,
                         help='"" inside a quoted field is not a quote')
    dialect.add_argument("--quoting", choices=["minimal", "none"], help="none: quotes are text (unquoted TSV)")
    dialect.add_argument("--no-header", dest="header", action="store_false", help='fields are named "1", "2", ...')
    dialect.add_argument("--comment", help="skip lines starting with this prefix, e.g. '#'")
    adhoc.add_argument("--detector", choices=["langdetect", "fasttext"])
    args = p.parse_args(argv)
    for name in ("delimiter", "quotechar", "escapechar"):  # '\t' typed in a shell
        if getattr(args, name) in ("\\t", "tab"):
            setattr(args, name, "\t")
    if "\\" in args.text:  # "\n" typed in a shell; latin-1 + backslashreplace keeps é, ’ and Cyrillic intact
        args.text = codecs.decode(args.text.encode("latin-1", "backslashreplace"), "unicode_escape")
    if bool(args.corpus) == bool(args.raw):
        p.error("give a configured corpus name, or --raw PATH... --out DIR (not both)")
    if args.raw and not args.out:
        p.error("--raw needs --out DIR")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    report = run_adhoc(args) if args.raw else run_configured(args.corpus, args.params, args.overrides)
    print(f"{report['corpus']}: {report['docs_in']} docs in, {report['docs_out']} kept; drops {report['drops']}; "
          f"fixes {report['fixes']}", file=sys.stderr)
    return 0
