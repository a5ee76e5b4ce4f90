"""``omi-bridge doctor``: one line per check, and for each problem the one line that fixes it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from bridge.app.doctor import run_checks
from bridge.app.findings import Finding, Status, blocking

MARKS = {Status.OK: "ok  ", Status.WARN: "warn", Status.FAIL: "FAIL"}


def format_findings(findings: list[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    lines = []
    for f in findings:
        line = f"{MARKS[f.status]}  {f.check:<{width}}  {f.detail}"
        if f.status is not Status.OK and f.fix:
            line += f"  → {f.fix}"
        lines.append(line)
    bad = blocking(findings)
    warned = sum(f.status is Status.WARN for f in findings)
    if bad:
        lines.append(f"{len(bad)} problem(s) keep the bridge from working; fix the FAIL lines above.")
    else:
        lines.append("Nothing blocks the bridge" + (f" ({warned} warning(s) above)." if warned else "."))
    return "\n".join(lines) + "\n"


def cmd_doctor(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    findings = run_checks(args.config)
    ok = not blocking(findings)
    if args.json:
        json.dump({"ok": ok, "checks": [f.as_dict() for f in findings]}, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(format_findings(findings))
    return 0 if ok else 1
