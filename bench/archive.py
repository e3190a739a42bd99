"""popbox's archive against notmuch: indexing, search latency and disk use, same mail.

    nice -n 0 .venv/bin/python -m bench.archive                 # 100,000 messages
    .venv/bin/python -m bench.archive --quick                   # 2,000, a minute or two
    .venv/bin/python -m bench.archive --messages 20000 --reps 3 --no-doc
    nice -n 0 .venv/bin/python -m bench.archive --reuse-notmuch  # notmuch's databases kept

bench.corpus writes the Maildirs (reused by later runs of the same size). notmuch gets a
private configuration and one database per user (``notmuch new``); popbox gets one
``SqliteArchive`` fed with ``add_batch`` from the same files. Both index from nothing,
alternating which goes first; then the same queries, written in each one's language,
run against the main user's mail in rounds that alternate the sides, timed in-process
(see bench.archive_sides). Writes bench/results/archive-<timestamp>/ and the part of
docs/performance.md between its archive markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench import corpus as corpus_module
from bench.archive_sides import Answer, Indexed, NotmuchSide, PopboxSide, octets_on_disk
from bench.corpus import MAIN_USER, Corpus

REPO: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = REPO / "bench" / "results"
DOC: Final = REPO / "docs" / "performance.md"
BEGIN: Final = "<!-- archive:begin -->"
END: Final = "<!-- archive:end -->"
FULL_MESSAGES: Final = 100_000
QUICK_MESSAGES: Final = 2_000
# Timed runs of each query per side per round; rounds alternate which side goes first.
RUNS_PER_ROUND: Final = 20
QUICK_RUNS_PER_ROUND: Final = 3
# A results page: what Gmail and notmuch's front ends show.
LIMIT: Final = 50
# The targets of the archive work: search no slower than notmuch, indexing at least
# half its speed (popbox also stores every message, deduplicated and compressed).
QUERY_TARGET: Final = 1.0
INDEX_TARGET: Final = 0.5


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    popbox: str
    notmuch: str


def cases() -> list[Case]:
    """The query set, in both languages; the words come from bench.corpus's vocabulary."""
    words = corpus_module.vocabulary()
    mid, rare, rare_a, rare_b = words[2_000], words[40_000], words[30_000], words[35_000]
    phrase = f'"{corpus_module.PHRASES[1]}"'
    return [
        Case("common", "common word", "meeting", "meeting"),
        Case("mid", "word of rank 2,000", mid, mid),
        Case("rare", "rare word (rank 40,000)", rare, rare),
        Case("phrase", "phrase of 8 words", phrase, phrase),
        Case("from", "from: a surname", "from:kingsley", "from:kingsley"),
        Case("subject", "subject: a word", "subject:invoice", "subject:invoice"),
        Case("cyrillic", "non-ASCII word (KOI8-R, UTF-8 mail)", "встреча", "встреча"),
        Case("dates", "date range (half a year)", "after:2023-01-01 before:2023-07-01",
             "date:2023-01-01..2023-06-30"),
        Case("attachment", "has:attachment", "has:attachment", "tag:attachment"),
        Case("filename", "attachment name", "filename:invoice", "attachment:invoice"),
        Case("boolean", "AND, OR, NOT", "meeting AND (budget OR report) AND NOT invoice",
             "meeting AND (budget OR report) AND NOT invoice"),
        Case("rare-or", "two rare words, OR", f"{rare_a} OR {rare_b}", f"{rare_a} OR {rare_b}"),
        Case("word-dates", "word within a month", "budget after:2024-01-01 before:2024-02-01",
             "budget AND date:2024-01-01..2024-01-31"),
        Case("newest", "most common word, newest 50", "the", "the"),
    ]


@dataclass
class Samples:
    index: dict[str, list[Indexed]]
    latency: dict[str, dict[str, list[float]]]
    answers: dict[str, dict[str, Answer]]
    octets: dict[str, int]


class Bench:
    def __init__(self, work: Path, messages: int, reps: int, index_reps: int,
                 runs: int, reuse_notmuch: bool = False) -> None:
        self.work = work
        self.reuse_notmuch = reuse_notmuch
        # With reuse_notmuch: where notmuch's indexing figures come from, if anywhere.
        self.notmuch_index_from: str | None = None
        self.reps, self.index_reps, self.runs = reps, index_reps, runs
        self.started = time.time()
        self.busy_before = _machine_busy()
        self.own_before = _own_tree_cpu()
        print(f"corpus: {messages:,} messages under {work / 'mail'}", flush=True)
        self.corpus: Corpus = corpus_module.build(work / "mail", messages)
        self.sides: list[NotmuchSide | PopboxSide] = [NotmuchSide(work, self.corpus),
                                                       PopboxSide(work, self.corpus)]
        self.cases = cases()
        self.samples = Samples({}, {}, {}, {})

    def run(self) -> None:
        for rep in range(self.index_reps):
            order = self.sides if rep % 2 == 0 else self.sides[::-1]
            for side in order:
                if self.reuse_notmuch and isinstance(side, NotmuchSide):
                    continue
                print(f"index {rep + 1}/{self.index_reps}: {side.name}", flush=True)
                done = side.index()
                self.samples.index.setdefault(side.name, []).append(done)
                print(f"    {done.messages:,} in {done.seconds:.1f} s "
                      f"({done.messages / done.seconds:,.0f}/s, CPU {done.cpu_seconds:.1f} s)",
                      flush=True)
        self.samples.octets = {side.name: side.octets() for side in self.sides}
        self.samples.octets["maildir"] = octets_on_disk(self.corpus.root)
        for side in self.sides:
            side.open(MAIN_USER)
            for case in self.cases:  # warm-up, untimed; its answers are compared
                answer = side.query(self._text(side, case), LIMIT)
                self.samples.answers.setdefault(case.key, {})[side.name] = answer
        for rep in range(self.reps):
            order = self.sides if rep % 2 == 0 else self.sides[::-1]
            print(f"queries {rep + 1}/{self.reps}: {', '.join(s.name for s in order)}",
                  flush=True)
            for case in self.cases:
                for side in order:
                    text = self._text(side, case)
                    times = [side.query(text, LIMIT).seconds for _ in range(self.runs)]
                    self.samples.latency.setdefault(case.key, {}).setdefault(
                        side.name, []).extend(times)
        for side in self.sides:
            side.close()
        if isinstance(self.sides[1], PopboxSide):
            self.sides[1].shutdown()

    @staticmethod
    def _text(side: NotmuchSide | PopboxSide, case: Case) -> str:
        return case.popbox if isinstance(side, PopboxSide) else case.notmuch

    # -- the report --------------------------------------------------------------------

    def index_table(self) -> list[str]:
        pb = _best(self.samples.index.get("popbox", []))
        nm = _best(self.samples.index.get("notmuch", []))
        rate = {name: (i.messages / i.seconds if i else None) for name, i in
                (("popbox", pb), ("notmuch", nm))}
        cpu = {name: (i.cpu_seconds / i.messages * 1000 if i else None) for name, i in
               (("popbox", pb), ("notmuch", nm))}
        ratio = _div(rate["popbox"], rate["notmuch"])
        met = "-" if ratio is None else ("met" if ratio >= INDEX_TARGET else "not met")
        octets = self.samples.octets
        mib = {key: value / 2**20 for key, value in octets.items()}
        both = mib["notmuch"] + mib["maildir"]
        return [
            "| figure | unit | popbox | notmuch | popbox/notmuch | target |",
            "|---|---|---|---|---|---|",
            f"| indexing, from nothing | messages/s | {_fmt(rate['popbox'])} | "
            f"{_fmt(rate['notmuch'])} | {_x(ratio)} | ≥ {INDEX_TARGET}x: {met} |",
            f"| CPU per 1,000 messages | CPU s | {_fmt(cpu['popbox'])} | {_fmt(cpu['notmuch'])} "
            f"| {_x(_div(cpu['popbox'], cpu['notmuch']))} | |",
            f"| on disk: popbox archive (index + messages) / notmuch database | MiB | "
            f"{_fmt(mib['popbox'])} | {_fmt(mib['notmuch'])} | "
            f"{_x(_div(mib['popbox'], mib['notmuch']))} | |",
            f"| on disk: popbox archive / what notmuch needs (Maildir + database) | MiB | "
            f"{_fmt(mib['popbox'])} | {_fmt(both)} | {_x(_div(mib['popbox'], both))} | |",
            f"| on disk: popbox archive / the raw Maildirs ({mib['maildir']:,.0f} MiB) | MiB | "
            f"{_fmt(mib['popbox'])} | | {_x(_div(mib['popbox'], mib['maildir']))} | |",
        ]

    def query_table(self) -> tuple[list[str], int, int, list[str]]:
        lines = [
            "| query | popbox / notmuch text | popbox p50 | p95 | notmuch p50 | p95 | "
            "p50 popbox/notmuch | matches popbox / notmuch | newest 50 shared |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        met = compared = 0
        mismatches: list[str] = []
        for case in self.cases:
            lat = self.samples.latency.get(case.key, {})
            pb, nm = lat.get("popbox", []), lat.get("notmuch", [])
            ratio = _div(_median(pb), _median(nm))
            if ratio is not None:
                compared += 1
                met += ratio <= QUERY_TARGET
            answers = self.samples.answers.get(case.key, {})
            apb, anm = answers.get("popbox"), answers.get("notmuch")
            shared = "-"
            if apb is not None and anm is not None:
                page = min(len(apb.top), len(anm.top))
                shared = f"{len(set(apb.top) & set(anm.top))}/{page}" if page else "0/0"
                if apb.total != anm.total:
                    mismatches.append(f"{case.label}: popbox {apb.total:,}, notmuch "
                                      f"{anm.total:,}")
            text = (f"`{case.popbox}`" if case.popbox == case.notmuch
                    else f"`{case.popbox}` / `{case.notmuch}`")
            lines.append(
                f"| {case.label} | {text} | {_ms(_median(pb))} | {_ms(_p95(pb))} | "
                f"{_ms(_median(nm))} | {_ms(_p95(nm))} | {_x(ratio)} | "
                f"{_count(apb)} / {_count(anm)} | {shared} |")
        return lines, met, compared, mismatches

    def reuse_notmuch_index(self, results: Path) -> None:
        """notmuch's databases are kept from an earlier run: its indexing figures are
        that run's, from the newest results.json under ``results`` with as many
        messages (none if there is none)."""
        if not self.reuse_notmuch:
            return
        for raw in sorted(results.glob("archive-*/results.json"), reverse=True):
            data = json.loads(raw.read_text())
            runs = data.get("index", {}).get("notmuch", [])
            if data.get("corpus", {}).get("messages") == self.corpus.messages and runs:
                self.samples.index["notmuch"] = [Indexed(**run) for run in runs]
                self.notmuch_index_from = raw.parent.name
                return

    def _index_note(self) -> str:
        if not self.reuse_notmuch:
            return ("- indexing: notmuch is `notmuch new` into an empty database per user, "
                    "CPU of the `notmuch` processes; popbox is `SqliteArchive.add_batch` of "
                    "500 files at a time into an empty archive, CPU of the bench process "
                    "(the archive's threads included). The best run per side; files in the "
                    "page cache.")
        earlier = (f"its indexing figures are those of the earlier run {self.notmuch_index_from}"
                   if self.notmuch_index_from else "its indexing was not measured in this run")
        return ("- indexing: **notmuch's databases were reused (`--reuse-notmuch`), not "
                f"rebuilt**: {earlier}; its queries were measured in this run. popbox is "
                "`SqliteArchive.add_batch` of 500 files at a time into an empty archive, "
                "CPU of the bench process (the archive's threads included), files in the "
                "page cache.")

    def write(self, command: str, results: Path) -> str:
        c = self.corpus
        busy = _machine_busy() - self.busy_before
        own = _own_tree_cpu() - self.own_before
        wall = time.time() - self.started
        others = max(0.0, busy - own) / max(1e-9, wall * (os.cpu_count() or 1))
        queries, met, compared, mismatches = self.query_table()
        users = ", ".join(f"{user} {count:,}" for user, count in c.per_user.items())
        samples = self.reps * self.runs
        text = "\n".join([
            f"_`{command}`: {self.index_reps} indexing run(s) "
            f"{'of popbox (notmuch: reused)' if self.reuse_notmuch else 'per side'} and "
            f"{self.reps} "
            f"rounds of {self.runs} runs per query per side ({samples} samples), sides "
            f"alternating; {time.strftime('%Y-%m-%d %H:%M')} UTC, {wall / 60:.0f} minutes "
            "in all._",
            "",
            *(f"- {line}" for line in _environment()),
            f"- corpus (bench.corpus): {c.messages:,} message files ({c.distinct:,} distinct; "
            f"{c.octets / 2**20:,.0f} MiB) in one Maildir per user ({users}); queries "
            f"search {MAIN_USER}'s mail. Generated in {c.seconds:.0f} s.",
            f"- the machine was {'not quiet' if others > 0.1 else 'quiet'}: other processes "
            f"used {others:.0%} of its CPU time during the run (system busy time less "
            "this run's own process tree).",
            self._index_note(),
            "- queries: in-process, warm; notmuch is `count_messages` plus the newest 50 "
            "with From and Subject through the notmuch2 bindings, popbox is "
            "`parse_query` plus `Archive.search(user, query, limit=50)` (entries and "
            "snippets). Matches differ where the two tokenise differently (notmuch stems "
            "English words, popbox does not), and are listed, not hidden.",
            "",
            *self.index_table(),
            "",
            *queries,
            "",
            f"Query target (median no slower than notmuch's): met for {met} of {compared} "
            "queries.",
            "",
            *([f"- different match counts: {line}" for line in mismatches]
              or ["- every query matched the same number of messages on both sides."]),
        ])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = results / f"archive-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text + "\n")
        raw = {
            "corpus": {k: v for k, v in asdict(c).items() if k != "root"},
            "index": {k: [asdict(i) for i in v] for k, v in self.samples.index.items()},
            "latency": self.samples.latency,
            "answers": {k: {s: asdict(a) for s, a in v.items()}
                        for k, v in self.samples.answers.items()},
            "octets": self.samples.octets,
        }
        (out / "results.json").write_text(json.dumps(raw, indent=1))
        return text


def _machine_busy() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _own_tree_cpu() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _environment() -> list[str]:
    def first_line(command: list[str]) -> str:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = first_line(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"])
    return [
        f"machine: {os.cpu_count()} cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.platform()}",
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; "
        f"{first_line(['notmuch', '--version'])} (Xapian underneath)",
        f"popbox at commit {commit}",
    ]


def _best(runs: list[Indexed]) -> Indexed | None:
    return min(runs, key=lambda run: run.seconds) if runs else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f}" if value < 10 else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:,.1f} ms" if value < 1 else f"{value:.2f} s"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _count(answer: Answer | None) -> str:
    return "-" if answer is None else f"{answer.total:,}"


def update_doc(text: str) -> None:
    doc = DOC.read_text()
    if BEGIN not in doc:
        doc += f"\n## The archive\n\n{BEGIN}\n{END}\n"
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=None,
                        help=f"message files in the corpus ({FULL_MESSAGES:,}; "
                        f"--quick: {QUICK_MESSAGES:,})")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3, help="rounds of queries")
    parser.add_argument("--index-reps", type=int, default=1,
                        help="indexing runs per side (each from nothing)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--reuse-notmuch", action="store_true",
                        help="keep the notmuch databases under --work from an earlier run "
                        "(its queries are measured again, its indexing is not)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the run's directory goes (report.md, results.json)")
    args = parser.parse_args(argv)
    messages = args.messages or (QUICK_MESSAGES if args.quick else FULL_MESSAGES)
    work = args.work or Path(f"/var/tmp/popbox-archive-{messages}")
    work.mkdir(parents=True, exist_ok=True)
    runs = QUICK_RUNS_PER_ROUND if args.quick else RUNS_PER_ROUND
    if args.reuse_notmuch and not (work / "notmuch").is_dir():
        parser.error(f"--reuse-notmuch: no notmuch databases under {work}")
    bench = Bench(work, messages, args.reps, args.index_reps, runs, args.reuse_notmuch)
    bench.reuse_notmuch_index(args.results)
    bench.run()
    shown = ["python -m bench.archive"]
    if args.quick:
        shown.append("--quick")
    if args.messages:
        shown.append(f"--messages {messages}")
    if args.reps != 3:
        shown.append(f"--reps {args.reps}")
    if args.index_reps != 1:
        shown.append(f"--index-reps {args.index_reps}")
    if args.reuse_notmuch:
        shown.append("--reuse-notmuch")
    text = bench.write(" ".join(shown), args.results)
    print(text)
    if not args.no_doc:
        update_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
