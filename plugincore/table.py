"""Plain-text tables for the admin commands (`netplugin status`, `volplugin status`)."""


def table(headers: list[str], rows: list[list]) -> str:
    """Columns as wide as their widest cell, two spaces apart; None and "" print as "-"."""
    cells = [[("-" if v in (None, "") else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [headers] + cells
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return text if rows else text + "\n(none)"
