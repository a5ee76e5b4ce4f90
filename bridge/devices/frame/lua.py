"""Python text as Lua source for the glasses' REPL: string literals, and pieces that fit one write."""

from __future__ import annotations


def lua_quote(text: str) -> str:
    """``text`` as a Lua string literal (the app is ASCII; anything else is escaped byte-wise)."""
    out = ['"']
    for b in text.encode("utf-8"):
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    out.append('"')
    return "".join(out)


def quoted_pieces(text: str, budget: int) -> list[str]:
    """Split ``text`` so each piece, once quoted, fits ``budget`` characters (never inside an
    escape sequence)."""
    pieces: list[str] = []
    cur: list[str] = []
    size = 2
    for ch in text:
        q = len(lua_quote(ch)) - 2
        if size + q > budget and cur:
            pieces.append("".join(cur))
            cur, size = [], 2
        cur.append(ch)
        size += q
    if cur:
        pieces.append("".join(cur))
    return pieces
