"""The crash-and-fault run's figures in bench/results.md, from the file ``make chaos`` writes.

``make chaos`` (tests/test_chaos.py, 100 SIGKILLs) takes most of an hour, too long for ``make
bench``; it writes its figures to ``bench/chaos.json`` and puts them into their section of
results.md (``python -m bench.chaos``), and every later ``make bench`` renders the newest of them
again, so results.md always shows the run's figures beside the bench's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

FIGURES = Path(__file__).resolve().parent / "chaos.json"
TITLE = "Crash and fault run (`make chaos`)"


def _row(label: str, value: object) -> str:
    return f"| {label} | {value} |"


def section(path: Path = FIGURES) -> tuple[str, list[str]] | None:
    """The results.md section for the run in ``path``, or None when it was never run."""
    try:
        f: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
    heard = f["words_heard"] or 1
    spoken = f["words_spoken"] or 1
    lines = [
        "`tests/test_chaos.py` runs the daemon over the fake BlueZ with a pendant streaming real "
        "speech, SIGKILLs and restarts it at random moments, and injects transcription exceptions, "
        "API 503s and timeouts, a full disk and link drops. Its short form runs in `make test`; "
        f"`make chaos` runs the long form. The newest long run ({when}, seed 12, on the 2-core "
        "machine shared with other work):",
        "",
        "| figure | value |",
        "|---|---|",
        _row("kills (while still starting) / daemon starts",
             f"{f['kills']} ({f['early_kills']}) / {f['daemon_starts']}"),
        _row("faults: ASR exceptions / API 503 / API timeouts / link drops",
             f"{f['asr_faults']} / {f['api_503']} / {f['api_timeouts']} / {f['link_drops']}"),
        _row("full-disk episodes", f"{f['disk_full_episodes']} ({f['disk_full_seconds']:.1f} s)"),
        _row("sentences heard in full / in part",
             f"{f['sentences_fully_heard']} / {f['sentences_partly_heard']}"),
        _row("words of those sentences: in full / in all heard", f"{f['words_spoken']} / {f['words_heard']}"),
        _row("words recalled (of the fully heard)",
             f"{f['words_recalled']} ({100 * f['words_recalled'] / spoken:.1f} %)"),
        _row("words posted / beyond what was heard / of which repeats",
             f"{f['words_posted']} / {f['words_excess']} ({100 * f['words_excess'] / heard:.1f} %) / "
             f"{f['words_repeated']}"),
        _row("duplicate segments / segments on silence / worst alignment",
             f"{f['duplicate_segments']} / {f['hallucinated_segments']} / "
             f"{f['worst_alignment_seconds']:.1f} s"),
        _row("conversations / re-posts answered from Omi's idempotency record",
             f"{f['conversations']} / {f['reposts']}"),
        _row("quarantined utterances", f["quarantined"]),
        _row("wall time", f"{f['seconds'] / 60:.0f} min"),
        "",
        "What the test holds the run to (tests/test_chaos.py `shortfalls`): every kill happened, "
        "one while starting and one with the disk full; every fault kind came; no segment posted "
        "twice (judged by time: no two segments cover the same moment) and no word posted more "
        "often than it was heard beyond 3 %; no text on silence; nothing quarantined; at least 85 % "
        "of the words of fully heard sentences recalled; words beyond what was heard at most 8 % "
        "of every sentence heard in full or in part. Excess words are those neither in the reference "
        "nor in what tiny.en hears in the same clips with no fault (alone, and packed in one window "
        "as the daemon packs them when it lags): garbles where a kill or a link drop cut a "
        "sentence. The short form in `make test` kills 10 times. One "
        "API fault waits at a time, so each counts a failed request; at the end the test runs "
        "`omi-bridge outbox retry ID` for items still on a back-off (up to 30 minutes after a long "
        "outage), as a user would.",
    ]
    return TITLE, lines


def refresh(md: Path, path: Path = FIGURES) -> bool:
    """Put the newest figures into results.md's section in place (``make chaos`` runs this after
    the test), so the rest of the bench's figures stay as their run wrote them. False when there is
    nothing to show."""
    found = section(path)
    if found is None:
        return False
    title, lines = found
    text = md.read_text() if md.exists() else ""
    block = f"## {title}\n\n" + "\n".join(lines) + "\n"
    start = text.find(f"## {title}")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + block + (text[end:] if end >= 0 else "")
    md.write_text(text)
    return True


if __name__ == "__main__":
    import sys

    from bench.report import MD_PATH

    sys.exit(0 if refresh(MD_PATH) else 1)
