"""How a job ended, read from what its launcher printed.

`hvdft launch` runs horovodrun or mpirun with their output piped through a `Watch`:
every rank's lines go on to the terminal as they arrive (progress bars included), but
the launcher's own epilogue does not — horovodrun's `RuntimeError: Horovod detected
that one or more processes exited with non-zero status` and its traceback, mpirun's
dashed banners. From that epilogue and from what each rank printed last, `conclude`
decides one `Outcome`: an input error every rank agreed on (exit 2), an interrupt
(130), a crashed or killed rank (1), or a launcher that failed on its own (1).

What the launchers print (Horovod 0.28.1, Open MPI 4.1):

- horovodrun tags each rank's output line (or progress frame ending in `\\r`) as
  `[RANK]<stdout>:` / `[RANK]<stderr>:` (after a timestamp with --prefix-timestamp);
  for each failed rank it prints `Process RANK exit with status code N.` (N = 128 +
  signal for a killed rank: its shell reports it so), then raises the RuntimeError
  naming the first failed process.
- mpirun, run with `--tag-output`, tags each fragment as `[JOB,RANK]<stdout>:` (a
  rank's line may arrive in several fragments); a killed rank gets a banner
  `mpirun noticed that process rank RANK ... exited on signal N (NAME).`, a failed one
  `The first process to do so was: Process name: [[JOB,1],RANK] Exit code: N`.

hvdft's ranks end with one status line (`hvdft: error: ...`, `hvdft: interrupted ...`,
written by `hvdft.cli.guarded`); those are held back and printed once, in the summary.
"""

from __future__ import annotations

import codecs
import re
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from hvdft.errors import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_USER_ERROR

# horovodrun: '[1]<stderr>:' (optionally after time.asctime()); mpirun: '[4711,1]<stderr>:'.
_TAG = re.compile(r"(?:[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4})?\[(?:\d+,)?(\d+)\]<(stdout|stderr)>:")
# What a read may end with when it ends inside a tag.
_TAG_START = re.compile(r"\[[\d,]*(?:\]<?[a-z]{0,6}>?)?")
# The last line a rank prints about how it ends (hvdft.cli.guarded).
_STATUS_LINE = re.compile(r"hvdft: (?:error: |interrupted\b|\[rank \d+\] interrupted\b)")
_SECONDARY = "stopped because another rank failed"
# horovodrun reports exits from one thread per rank, so two reports can share a line:
# 'Process 0 exit with status code 2.Process 1 exit with status code 2.'
_HVD_EXIT = re.compile(r"Process (\d+) exit with status code (-?\d+)\.")
_HVD_TERMINATING = re.compile(r"Terminating remaining workers after failure of Process \d+\.")
_HVD_FIRST = re.compile(r"Process name: (\d+)\s+Exit code: (-?\d+)")
_MPI_SIGNAL = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on\s+signal (\d+) \(([^)]*)\)")
_MPI_FIRST = re.compile(r"Process name: \[\[\d+,\d+\],(\d+)\]\s+Exit code:\s+(-?\d+)")
_MPI_IMPROPER = re.compile(r"process rank (\d+) with PID \d+ on\s+node (\S+) exiting improperly")
_MPI_KNOWN = re.compile(r"Primary job\s+terminated normally|mpirun has exited due to process rank")
_DASHES = re.compile(r"^-{20,}\s*$")
_BANNER_AFTER = re.compile(r"(?<=.)-{70,}\n$")

LAST_LINES = 10


@dataclass
class RankLog:
    """What one rank printed: its last lines and its held-back status lines."""

    rank: int
    last: deque[str] = field(default_factory=lambda: deque(maxlen=LAST_LINES))
    status_lines: list[str] = field(default_factory=list)
    partial: dict[str, str] = field(default_factory=dict)  # stream -> text not yet ended by \n or \r

    @property
    def secondary(self) -> bool:
        """It stopped only because a peer failed (hvdft says so on such a rank)."""
        return any(_SECONDARY in line for line in self.status_lines)


class Watch:
    """Passes a launcher's output on, line by line, while reading how the job ends.

    `feed(stream, text)` takes decoded chunks of the launcher's stdout ('stdout') or
    stderr ('stderr') in arrival order; two reader threads may call it. `launcher` is
    'horovodrun' (ranks' lines are passed on with horovodrun's own `[N]<stream>:` tag,
    as when running horovodrun directly) or 'mpirun' (tags are removed again: hvdft
    labels its non-zero ranks' lines itself, as under plain mpirun).
    """

    def __init__(self, launcher: str, out: TextIO, err: TextIO) -> None:
        self.launcher = launcher
        self.sinks = {"stdout": out, "stderr": err}
        self.ranks: dict[int, RankLog] = {}
        self.exits: dict[int, int] = {}  # rank -> exit status the launcher reported
        self.signals: dict[int, tuple[int, str]] = {}  # rank -> (signal, name), mpirun's report
        self.first: int | None = None  # the rank the launcher names as the first to fail
        self.aborting = False  # mpirun said it is ending the job
        self.launcher_lines: list[str] = []  # its own epilogue, held back
        self._pending = {"stdout": "", "stderr": ""}  # a read that may end inside a tag
        self._launcher_pending = {"stdout": "", "stderr": ""}  # the launcher's own unfinished line
        self._open: dict[str, tuple[RankLog, str, str] | None] = {"stdout": None, "stderr": None}
        self._traceback = {"stdout": False, "stderr": False}
        self._banner: list[str] | None = None
        self._line_open = {"stdout": False, "stderr": False}
        self._orphans = {"stdout": 0, "stderr": 0}  # blank lines still due from glued reports
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- input

    def feed(self, stream: str, text: str) -> None:
        """Take the next chunk of one of the launcher's streams."""
        with self._lock:
            buffer = self._pending[stream] + text
            self._pending[stream] = ""
            pos = 0
            while pos < len(buffer):
                tag = _TAG.search(buffer, pos)
                if tag is None:
                    # A tag may be split over two reads: keep a possible beginning of one.
                    start = buffer.rfind("[", pos)
                    if start != -1 and _TAG_START.fullmatch(buffer, start):
                        self._pending[stream] = buffer[start:]
                        buffer = buffer[:start]
                    self._text(stream, buffer[pos:])
                    break
                self._text(stream, buffer[pos : tag.start()])
                rank = int(tag.group(1))
                self._open[stream] = (self.ranks.setdefault(rank, RankLog(rank)), tag.group(2), tag.group(0))
                pos = tag.end()

    def _text(self, stream: str, text: str) -> None:
        """Untagged text: the rest of the open rank fragment, then the launcher's own."""
        if not text:
            return
        if self._open[stream] is not None:
            log, rank_stream, tag = self._open[stream]
            end = self._fragment_end(text)
            piece, text = text[:end], text[end:]
            self._rank_text(log, rank_stream, piece, tag)
            if end == 0 or piece[-1] not in ("\r\n" if self.launcher == "horovodrun" else "\n"):
                return  # the fragment goes on in the next read
            self._open[stream] = None
            if not text:
                return
        buffer = self._launcher_pending[stream] + text
        cut = buffer.rfind("\n") + 1
        self._launcher_pending[stream] = buffer[cut:]
        for line in buffer[:cut].splitlines(keepends=True):
            self._launcher_line(stream, line)

    def _fragment_end(self, text: str) -> int:
        """Where a rank's fragment ends in untagged text that follows its tag.

        horovodrun writes each tagged line or progress frame whole, ending in a newline or a
        carriage return; mpirun tags what a rank wrote and again after each newline in it,
        so there a fragment ends at a newline.
        """
        match = re.search(r"[\r\n]" if self.launcher == "horovodrun" else r"\n", text)
        return match.end() if match else len(text)

    def close(self) -> None:
        """End of output: whatever is left unterminated is read too."""
        with self._lock:
            for stream in ("stdout", "stderr"):
                rest, self._pending[stream] = self._pending[stream], ""
                self._text(stream, rest)
                self._open[stream] = None
                if self._launcher_pending[stream]:
                    self._text(stream, "\n")
            for log in self.ranks.values():
                for rank_stream, rest in list(log.partial.items()):
                    if rest:
                        self._rank_text(log, rank_stream, "\n", "")
            if self._banner:
                self._end_banner()
            if self.launcher == "horovodrun" and not self.exits:
                # No exit report came through, but horovodrun's exception names the first.
                if match := _HVD_FIRST.search(" ".join(line.strip() for line in self.launcher_lines)):
                    self._exited(int(match.group(1)), int(match.group(2)))

    def _rank_text(self, log: RankLog, stream: str, text: str, tag: str) -> None:
        """Collect a rank's text into lines (ending in a newline) and progress frames
        (ending in a carriage return)."""
        buffer = log.partial.pop(stream, "") + text
        for unit in re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", buffer):
            banner = _BANNER_AFTER.search(unit) if self.launcher == "mpirun" else None
            if banner:
                # A progress frame (no newline) directly followed by mpirun's own banner.
                self._write(stream, unit[: banner.start()])
                self._launcher_line(stream, banner.group(0))
            elif unit.endswith(("\n", "\r")):
                self._rank_line(log, stream, unit, tag)
            else:
                log.partial[stream] = unit

    def _rank_line(self, log: RankLog, stream: str, text: str, tag: str) -> None:
        body = text.rstrip("\r\n")
        status = _STATUS_LINE.search(body)
        if status:
            # Held back for the summary; what precedes it is a progress frame left open.
            log.status_lines.append(body[status.start() :])
            if status.start():
                self._write(stream, (tag if self.launcher == "horovodrun" else "") + body[: status.start()])
            return
        if text.endswith("\n") and body.strip():
            log.last.append(body.rsplit("\r", 1)[-1])
        prefix = tag if self.launcher == "horovodrun" else ""
        self._write(stream, prefix + text)

    def _launcher_line(self, stream: str, line: str) -> None:
        body = line.rstrip("\r\n")
        if self.launcher == "horovodrun":
            self._horovodrun_line(stream, line, body)
        else:
            self._mpirun_line(stream, line, body)

    def _horovodrun_line(self, stream: str, line: str, body: str) -> None:
        if self._traceback[stream] or body.startswith("Traceback (most recent call last):"):
            # horovodrun's own exception: everything after it on this stream is its epilogue.
            self._traceback[stream] = True
            self.launcher_lines.append(body)
            return
        if not body and self._orphans[stream]:
            self._orphans[stream] -= 1  # the newline of a report that was glued to another
            return
        reports = list(_HVD_EXIT.finditer(body)) + list(_HVD_TERMINATING.finditer(body))
        for match in reports:
            if match.re is _HVD_EXIT:
                self._exited(int(match.group(1)), int(match.group(2)))
        self._orphans[stream] += max(0, len(reports) - 1)
        rest = _HVD_TERMINATING.sub("", _HVD_EXIT.sub("", body))
        if rest == body:
            self._write(stream, line)
        elif rest.strip():  # a report glued to other text: the text goes on, the report does not
            self._write(stream, rest + line[len(body) :])

    def _mpirun_line(self, stream: str, line: str, body: str) -> None:
        if self._banner is None and _DASHES.match(body):
            self._banner = [body]
            return
        if self._banner is not None:
            self._banner.append(body)
            if _DASHES.match(body):
                self._end_banner()
            return
        self._write(stream, line)

    def _end_banner(self) -> None:
        lines, self._banner = self._banner or [], None
        text = " ".join(line.strip() for line in lines)
        known = False
        for match in _MPI_SIGNAL.finditer(text):
            rank, signum = int(match.group(1)), int(match.group(3))
            self.signals[rank] = (signum, match.group(4))
            self._exited(rank, 128 + signum)
            known = True
        if match := _MPI_FIRST.search(text):
            self.first = int(match.group(1))  # mpirun's own verdict on who failed first
            self._exited(int(match.group(1)), int(match.group(2)))
            known = True
        if match := _MPI_IMPROPER.search(text):
            self._exited(int(match.group(1)), self.exits.get(int(match.group(1)), 1))
            known = True
        known = known or bool(_MPI_KNOWN.search(text))
        self.aborting = self.aborting or known
        self.launcher_lines.extend(line for line in lines if line.strip() and not _DASHES.match(line))
        if not known:  # mpirun's own problem (slots, daemons, ssh): the user needs it as it is
            self._write("stderr", "".join(line + "\n" for line in lines))

    def _exited(self, rank: int, status: int) -> None:
        self.exits.setdefault(rank, status)
        if self.first is None:
            self.first = rank

    def _write(self, stream: str, text: str) -> None:
        if not text:
            return
        sink = self.sinks[stream]
        sink.write(text)
        sink.flush()
        self._line_open[stream] = not text.endswith("\n")

    def verdict(self) -> int | None:
        """The job's end as rank 0 announced it for every rank, if it did: 2 for an input
        error that is not one rank's own (`hvdft: error: ...` without a rank label: agreed
        through dist.agree, or an option every rank rejects before Horovod starts), 130
        for `hvdft: interrupted by a signal` (every rank has passed the checkpoint's
        barrier). Either way every rank is exiting by itself."""
        with self._lock:
            lines = self.ranks[0].status_lines if 0 in self.ranks else []
        for line in lines:
            if line.startswith("hvdft: interrupted by a signal"):
                return EXIT_INTERRUPTED
            if line.startswith("hvdft: error: ") and not line.startswith("hvdft: error: [rank "):
                return EXIT_USER_ERROR
        return None

    def end_line(self) -> None:
        """End a progress frame left on the terminal, so what follows starts a line."""
        for stream, line_open in self._line_open.items():
            if line_open:
                self._write(stream, "\n")


def pump(fd: int, stream: str, watch: Watch) -> Callable[[], None]:
    """A reader for one pipe: raw reads (a progress frame must not wait for a newline),
    decoded incrementally (a UTF-8 character may span two reads)."""
    import os

    def run() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = os.read(fd, 65536)
            text = decoder.decode(chunk, final=not chunk)
            if text:
                watch.feed(stream, text)
            if not chunk:
                return

    return run


# ------------------------------------------------------------------ the verdict


@dataclass
class Outcome:
    """How one launch ended.

    `code` is hvdft launch's exit status (0, 2 input error, 130 interrupted, 1 anything
    else); `kind` one of 'ok', 'input', 'interrupt', 'crash', 'killed', 'launcher';
    `reason` one line on the cause; `rank`/`status` the rank it is about and the exit
    status the launcher reported for it; `details` the lines to show before the summary
    (the rank's last lines); `summary` the final lines (`hvdft: error: ...`).
    """

    code: int
    kind: str
    reason: str = ""
    rank: int | None = None
    status: int | None = None
    details: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    @property
    def retryable(self) -> bool:
        """A restart may help: not an input error, not an interrupt, not success."""
        return self.kind in ("crash", "killed", "launcher")


def describe_status(status: int, mpi_signal: tuple[int, str] | None = None) -> str:
    """'exited with status 1' or 'was killed by signal 9 (SIGKILL)'."""
    signum = mpi_signal[0] if mpi_signal else (status - 128 if 128 < status < 128 + 65 else None)
    if signum is None:
        return f"exited with status {status}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = mpi_signal[1] if mpi_signal else f"signal {signum}"
    return f"was killed by signal {signum} ({name})"


def conclude(watch: Watch, returncode: int, interrupted: bool, launcher: str, hosts: list[str]) -> Outcome:
    """The outcome of a finished launch.

    `returncode` is the launcher's exit status, `interrupted` whether hvdft launch
    itself received (and forwarded) SIGINT/SIGTERM, `hosts` the host of each rank in
    rank order (for naming where a rank ran; may be shorter than the job).
    """
    if returncode == 0:
        return Outcome(0, "ok")
    status_lines = [line for r in sorted(watch.ranks) for line in watch.ranks[r].status_lines]
    if interrupted or any(status == EXIT_INTERRUPTED for status in watch.exits.values()) or any(
        line.startswith("hvdft: interrupted") for line in status_lines
    ):
        said = [line for line in status_lines if line.startswith("hvdft: interrupted")]
        return Outcome(EXIT_INTERRUPTED, "interrupt", "interrupted", summary=_unique(said) or ["hvdft: interrupted"])
    rank = _cause(watch)
    if rank is None:
        return _launcher_failed(watch, returncode, launcher, status_lines)
    status = watch.exits.get(rank, returncode)
    log = watch.ranks.get(rank, RankLog(rank))
    # A rank that stopped only because a peer failed has nothing to say about the input.
    errors = [line for line in status_lines if line.startswith("hvdft: error: ") and _SECONDARY not in line]
    if status == EXIT_USER_ERROR:
        said = _unique(errors) or [f"hvdft: error: rank {rank} exited with status 2 (an input error) and said nothing"]
        return Outcome(EXIT_USER_ERROR, "input", said[0][len("hvdft: error: ") :], rank, status, summary=said)
    where = f" on {hosts[rank]}" if rank < len(hosts) else ""
    what = describe_status(status, watch.signals.get(rank))
    crash = next((line.split(" crashed: ", 1)[1] for line in log.status_lines if " crashed: " in line), None)
    reason = f"rank {rank}{where} {what}" + (f": {crash}" if crash else "")
    said = [f"  {line}" for line in [*log.last, *log.status_lines]]
    details = [f"rank {rank}{where} {what}; " + ("its last lines:" if said else "it printed nothing"), *said]
    kind = "killed" if watch.signals.get(rank) or (128 < status < 128 + 65) else "crash"
    return Outcome(EXIT_CRASH, kind, reason, rank, status, details, [f"hvdft: error: {reason}"])


def _cause(watch: Watch) -> int | None:
    """The rank whose failure ended the job: the launcher's first failed rank, unless
    hvdft says that rank only stopped because a peer failed and another failed rank
    did not."""
    failed = [r for r in watch.exits if watch.exits[r] != 0]
    order = ([watch.first] if watch.first in failed else []) + sorted(r for r in failed if r != watch.first)
    if not order:
        return None
    primary = [r for r in order if not (r in watch.ranks and watch.ranks[r].secondary)]
    return (primary or order)[0]


def _launcher_failed(watch: Watch, returncode: int, launcher: str, status_lines: list[str]) -> Outcome:
    errors = _unique([line for line in status_lines if line.startswith("hvdft: error: ") and _SECONDARY not in line])
    if errors and returncode == EXIT_USER_ERROR:  # e.g. one rank, or a launcher that reports no statuses
        return Outcome(EXIT_USER_ERROR, "input", errors[0][len("hvdft: error: ") :], summary=errors)
    # The last line of its traceback is the exception; for mpirun the banner's first line.
    said = [line.strip() for line in watch.launcher_lines if line.strip()]
    if launcher == "horovodrun":
        cause = said[-1] if said else "it printed nothing more"
    else:
        cause = said[0] if said else "it printed nothing more"
    reason = f"{launcher} exited with status {returncode} without naming a failed rank: {cause}"
    return Outcome(EXIT_CRASH, "launcher", reason, status=returncode, summary=[*errors, f"hvdft: error: {reason}"])


def _unique(lines: list[str]) -> list[str]:
    """Lines in order, each once: ranks that all failed the same way said the same."""
    return list(dict.fromkeys(lines))
